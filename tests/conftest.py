"""Shared fixtures: the committed tiny tokenizer, data-file writers and a launcher runner.

Everything is hermetic: no hub access (HF_HUB_OFFLINE), SwanLab only in local mode, every
output under pytest's tmp dirs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pickle
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import psutil
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from llmtrain.paths import TINY_MODEL_DIR

REPO_ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Two pytest-xdist workers share the cores: one thread each for torch in the workers and in what they start
# (the launcher already gives each CPU rank its share). More would only spin-wait for a core the other worker holds.
SHARED_CORES = bool(os.environ.get("PYTEST_XDIST_WORKER"))
if SHARED_CORES:
    import torch

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for a module's tests (``pytestmark = pytest.mark.usefixtures(...)``): on tiny
    tensors thread hand-offs cost more than they save, and on a busy 2-core box far more."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(TINY_MODEL_DIR)


def write_jsonl(path: Path, records: Iterable[object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def prose_records(count: int, words: int = 60) -> list[dict[str, str]]:
    """Distinct, deterministic English-ish documents."""
    vocabulary = ["the", "model", "reads", "a", "block", "of", "text", "and", "learns", "which", "token", "next"]
    return [
        {"text": " ".join(vocabulary[(i * 7 + j) % len(vocabulary)] for j in range(words)) + f" ({i})."}
        for i in range(count)
    ]


def subprocess_env(tmp_path: Path, **extra: str | None) -> dict[str, str]:
    """Environment for a launched run: offline, local SwanLab, the test's Python; ``NAME=None`` unsets NAME."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SWANLAB_", "PYTEST_"))}
    env.update(
        PYTHON=sys.executable,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_DATASETS_CACHE=str(tmp_path / "hf-datasets"),
        SWANLAB_MODE="local",
        PYTHONPATH=str(REPO_ROOT),
        # The launchers' preflight costs ~3 CPU-s of imports per launch; tests that check it set SKIP_DOCTOR=0.
        SKIP_DOCTOR="1",
    )
    for name, value in extra.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def run_entry(
    args: list[str], tmp_path: Path, entry: str = "pretrain.py", timeout: float = 300, **env: str | None
) -> subprocess.CompletedProcess[str]:
    """Run ``python ENTRY ARGS`` (one process, no launcher) and capture its output."""
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / entry), *args],
        cwd=tmp_path,
        env=subprocess_env(tmp_path, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class EntryServer:
    """Runs ``python ENTRY ARGS`` through a fork server (``tests/entry_server.py``) that imported the entry
    points once: the same code, argv, directory, environment and exit code as :func:`run_entry`, without
    ~4 s of imports per run. For the integration tier's single-process runs; launches stay real processes.
    """

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.runs = 0
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.entry_server"], cwd=REPO_ROOT, env=subprocess_env(tmp_path),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self._reply() == {"ready": True}

    def _reply(self, timeout: float = 120) -> dict:
        """The server's next line; past ``timeout`` seconds the server and its run are killed."""
        assert self.process.stdout is not None
        readable, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not readable:
            for process in [*psutil.Process(self.process.pid).children(recursive=True), self.process]:
                with contextlib.suppress(psutil.Error):
                    process.kill()
            raise subprocess.TimeoutExpired(self.process.args, timeout)
        line = self.process.stdout.readline()
        assert line, f"the entry server exited with {self.process.wait()}"
        return json.loads(line)

    def run(
        self, args: list[str], tmp_path: Path, entry: str = "pretrain.py", timeout: float = 300, **env: str | None
    ) -> subprocess.CompletedProcess[str]:
        self.runs += 1
        stdout, stderr = (self.tmp_path / f"run-{self.runs}.{name}" for name in ("stdout", "stderr"))
        request = {"entry": entry, "args": args, "cwd": str(tmp_path), "env": subprocess_env(tmp_path, **env),
                   "stdout": str(stdout), "stderr": str(stderr)}  # fmt: skip
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        returncode = self._reply(timeout)["returncode"]
        return subprocess.CompletedProcess(
            [entry, *args], returncode, stdout.read_text(errors="replace"), stderr.read_text(errors="replace")
        )

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=60)


_shared_entry_server: list[EntryServer] = []


def shared_entry_server() -> EntryServer:
    """The session's :class:`EntryServer`, started on first use and closed at the end of the session."""
    if not _shared_entry_server:
        _shared_entry_server.append(EntryServer(Path(tempfile.mkdtemp(prefix="llmtrain-entry-server-"))))
    return _shared_entry_server[0]


def served_entry(
    args: list[str], tmp_path: Path, entry: str = "pretrain.py", timeout: float = 300, **env: str | None
) -> subprocess.CompletedProcess[str]:
    """:func:`run_entry` through the session's :class:`EntryServer`: for the many single-process runs of the
    integration tier (a real ``python ENTRY`` launch costs ~4 s of imports more). Not thread-safe."""
    return shared_entry_server().run(args, tmp_path, entry=entry, timeout=timeout, **env)


@pytest.fixture(scope="session", autouse=True)
def _close_the_shared_entry_server() -> Iterator[None]:
    yield
    while _shared_entry_server:
        server = _shared_entry_server.pop()
        server.close()
        shutil.rmtree(server.tmp_path, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(command: list[str], tmp_path: Path, log_name: str, **env: str) -> subprocess.Popen[bytes]:
    log = (tmp_path / log_name).open("wb")
    return subprocess.Popen(
        command, cwd=tmp_path, env=subprocess_env(tmp_path, **env), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip


def wait(process: subprocess.Popen[bytes], tmp_path: Path, log_name: str, timeout: float = 420) -> str:
    returncode = process.wait(timeout=timeout)
    output = (tmp_path / log_name).read_text(errors="replace")
    assert returncode == 0, output[-4000:]
    return output


def kill_every_rank(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the launcher and every descendant (torchrun's workers leave its process group)."""
    family = [process.pid, *(child.pid for child in psutil.Process(process.pid).children(recursive=True))]
    for pid in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait(timeout=30)
    deadline = time.monotonic() + 30
    while any(is_running(pid) for pid in family):
        assert time.monotonic() < deadline, "a rank survived SIGKILL"
        time.sleep(0.1)


def wait_for_checkpoint(process: subprocess.Popen[bytes], checkpoint: Path, log: Path, timeout: float = 300) -> None:
    """Block until ``checkpoint`` is complete (its completion marker exists)."""
    deadline = time.monotonic() + timeout
    while not (checkpoint / "llmtrain_complete.json").is_file():
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {checkpoint.name} within {timeout} s"
        time.sleep(0.1)


def is_running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def complete_steps(output_dir: Path) -> list[int]:
    """Steps of the checkpoints that carry a completion marker, oldest first."""
    return sorted(int(p.parent.name.split("-")[1]) for p in output_dir.glob("checkpoint-*/llmtrain_complete.json"))


def read_summary(output_dir: Path) -> dict:
    return json.loads((output_dir / "train_summary.json").read_text())


def train_log(output_dir: Path) -> list[dict]:
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


def save_random_tiny_model(directory: Path, seed: int = 0) -> Path:
    """A randomly initialised tiny Qwen2 with its tokenizer, saved like a pretrained model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_MODEL_DIR))
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(TINY_MODEL_DIR).save_pretrained(directory)
    return directory


def save_random_tiny_qwen3_model(directory: Path, seed: int = 0) -> Path:
    """A randomly initialised tiny Qwen3 (q/k norm, explicit head_dim) with the tiny tokenizer and its
    Qwen3-style think template (not prefix-stable, renders reasoning_content), saved like a pretrained model."""
    import torch
    from transformers import AutoConfig, Qwen3Config, Qwen3ForCausalLM

    from llmtrain.paths import TINY_THINK_TEMPLATE

    tiny = AutoConfig.from_pretrained(TINY_MODEL_DIR)
    config = Qwen3Config(
        vocab_size=tiny.vocab_size, hidden_size=tiny.hidden_size, intermediate_size=tiny.intermediate_size,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=tiny.max_position_embeddings, tie_word_embeddings=True,
        eos_token_id=tiny.eos_token_id, pad_token_id=tiny.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    Qwen3ForCausalLM(config).save_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    tokenizer.chat_template = TINY_THINK_TEMPLATE.read_text(encoding="utf-8")
    tokenizer.save_pretrained(directory)
    return directory


TINY_HYBRID_TEXT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
    linear_conv_kernel_dim=4, max_position_embeddings=2048,
    rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                     "mrope_section": [2, 1, 1], "mrope_interleaved": True},
)  # fmt: skip
# Weights some published Qwen3.5 checkpoints carry beside the model (multi-token prediction); transformers skips them.
MTP_TENSORS = {"mtp.fc.weight": (64, 128), "mtp.norm.weight": (64,), "mtp.layers.0.mlp.up_proj.weight": (128, 64)}


def save_random_tiny_qwen3_5_model(
    directory: Path, seed: int = 0, tokenizer: PreTrainedTokenizerBase | None = None, tie_declared: str = "top"
) -> Path:
    """A randomly initialised tiny Qwen3.5 (3 Gated DeltaNet + 1 gated attention layer) in the published layout.

    As the hub publishes them: ``Qwen3_5ForConditionalGeneration`` with a (tiny) vision tower, the text
    model under ``model.language_model.*``, ``mtp.*`` tensors, and tied embeddings declared where
    ``tie_declared`` says: ``"top"`` (the top level only, as in published configs), ``"both"``. The
    tokenizer (default: the tiny one with its think template) decides the vocabulary.
    """
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    from llmtrain.paths import TINY_THINK_TEMPLATE

    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
        tokenizer.chat_template = TINY_THINK_TEMPLATE.read_text(encoding="utf-8")
    vocab_size = len(tokenizer) + (-len(tokenizer)) % 64
    text = dict(TINY_HYBRID_TEXT, vocab_size=vocab_size, eos_token_id=tokenizer.eos_token_id)
    vision = dict(
        depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, num_position_embeddings=64
    )
    config = Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=True)
    config.architectures = ["Qwen3_5ForConditionalGeneration"]
    torch.manual_seed(seed)
    Qwen3_5ForConditionalGeneration(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    weights = load_file(directory / "model.safetensors")
    generator = torch.Generator().manual_seed(seed + 1)
    weights.update({name: torch.randn(shape, generator=generator) for name, shape in MTP_TENSORS.items()})
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    config_file = directory / "config.json"
    saved = json.loads(config_file.read_text())
    if tie_declared == "top":
        saved["text_config"].pop("tie_word_embeddings", None)
    else:
        saved["text_config"]["tie_word_embeddings"] = True
    config_file.write_text(json.dumps(saved, indent=2))
    return directory


def reasoning_conversations(count: int) -> list[dict[str, object]]:
    """OpenAI-format conversations whose answers carry ``reasoning_content``, half of them two answers long."""
    records: list[dict[str, object]] = []
    for i in range(count):
        messages = [
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"It is {2 * i}.", "reasoning_content": f"{i} and {i} make {2 * i}."},
        ]
        if i % 2 == 0:
            messages += [
                {"role": "user", "content": "And doubled?"},
                {"role": "assistant", "content": f"It is {4 * i}.", "reasoning_content": f"Twice {2 * i}."},
            ]
        records.append({"messages": messages})
    return records


def qa_conversations(count: int) -> list[dict[str, object]]:
    """Short ShareGPT-format conversations (Belle's human/gpt speakers), some multi-turn."""
    records: list[dict[str, object]] = []
    for i in range(count):
        turns = [{"from": "human", "value": f"What is {i} plus {i}?"}, {"from": "gpt", "value": f"It is {2 * i}."}]
        if i % 3 == 0:
            turns += [{"from": "human", "value": "And doubled?"}, {"from": "gpt", "value": f"It is {4 * i}."}]
        if i % 5 == 0:
            turns.insert(0, {"from": "system", "value": "Answer with one sentence."})
        records.append({"conversations": turns})
    return records


# --- tiny batches for loss tests: padded, packed and flattened, packed and kept as rows -----------------

PACKED_ROWS = [
    {"input_ids": [5, 6, 7, 8, 9, 10, 11], "labels": [-100, -100, 7, 8, 9, 10, 11], "position_ids": list(range(7))},
    {"input_ids": [12, 13, 14, 15], "labels": [-100, 13, 14, -100], "position_ids": list(range(4))},
]


def padded_batch(vocab_size: int, length: int = 10, padded_from: int = 6) -> dict:
    """Two random rows of ``length`` tokens, the second padded from ``padded_from``; the first 3 labels -100."""
    import torch

    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, vocab_size, (2, length), generator=generator)
    attention_mask = torch.ones(2, length, dtype=torch.long)
    attention_mask[1, padded_from:] = 0
    labels = input_ids.clone()
    labels[:, :3] = -100
    labels[attention_mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def packed_batch() -> dict:
    """Two conversations packed into one row, flattened (flash-attention's layout): 11 positions."""
    from llmtrain.data.collate import FlatPackedCollator

    return FlatPackedCollator()([{key: PACKED_ROWS[0][key] + PACKED_ROWS[1][key] for key in PACKED_ROWS[0]}])


def packed_rows_batch() -> dict:
    """The same two conversations as two packed rows kept as rows (sdpa's layout), the second padded."""
    from llmtrain.data.collate import PackedRowsCollator
    from llmtrain.metrics import PADDED_POSITIONS

    batch = PackedRowsCollator(pad_token_id=0)(PACKED_ROWS)
    batch.pop(PADDED_POSITIONS)
    return batch


def loss_and_grads(model, batch: dict, **kwargs: object) -> tuple:
    """The model's output on ``batch`` and every parameter's gradient after backward."""
    model.zero_grad()
    outputs = model(**batch, **kwargs)
    outputs.loss.backward()
    return outputs, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], T]) -> T:
    """``build(directory)``, once per session, for every test that needs it, whichever worker runs it.

    Under pytest-xdist the first worker to need it builds it in the session's shared temporary root
    while holding a lock; the result is pickled beside it, and every later caller (the other worker,
    or this one after pytest tore a module fixture down) loads that instead of building again. For
    the runs several tests read: a reference run, a run whose results tests check one by one.
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # .../pytest-N/popen-gwK -> .../pytest-N, shared by the workers
    directory = root / name
    result = directory / ".built.pickle"
    with (root / f".{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if result.is_file():
            return pickle.loads(result.read_bytes())
        shutil.rmtree(directory, ignore_errors=True)  # a failed attempt's leftovers
        directory.mkdir(parents=True)
        value = build(directory)
        result.write_bytes(pickle.dumps(value))
        return value


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Hand the longest tests out first (``pytest -n 2 --dist load --maxschedchunk 1``, pyproject.toml: each
    worker takes the next test when it is free), and the many short ones fill the gaps at the end: the
    slow single-process runs of the integration tier (one test each, the quick start's the longest), then
    the launches of the distributed tier, then the rest, each in collection order."""

    def order(item: pytest.Item) -> int:
        if item.get_closest_marker("slow") is None:
            return 2
        return 0 if "integration" in item.path.parts else 1

    items.sort(key=order)
