"""The docs stay true: the configuration reference is the generated one, and every name the docs give exists.

README.md and docs/*.md name files (`configs/sft_tiny_lora.yaml`), modules and symbols
(`llmtrain.tools.merge`, `compat.TRAINER_OVERRIDES`), tests (`tests/unit/test_x.py::test_y`) and
other pages (`[...](docs/data.md#weighted-sources)`). Each is checked against the checkout: paths
on disk (relative to the repository root, or to `llmtrain/` as the module map writes them), dotted
names by reading the module's source (no import, so the check is fast), tests by their function
names, links and their anchors by the target page's headings. Names that are not in the checkout on
purpose (what a run writes, the user's own files, other projects' files) are listed once, in
:data:`NOT_IN_CHECKOUT`.
"""

from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

from llmtrain.paths import PROJECT_ROOT
from llmtrain.tools import config_reference

PAGES = [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]
PACKAGE = PROJECT_ROOT / "llmtrain"
# Names the docs give that are not in the checkout, by prefix; the docs say what each is.
NOT_IN_CHECKOUT = (
    # What a run, a prepare or a launch writes: the output dir and what is in it, prepared data, caches.
    "outputs/", "output_dir/", "checkpoint-N", "logs/", "swanlog/", "data_ledger/", "dataloader/",
    ".final-partial/", "previous/", "train/", "validation/", "run_manifest.json", "run_config.yaml",
    "train_summary.json", "trainer_state.json", "loss_curve.png", "generation_config.json", "config.json",
    "model.safetensors", "adapter_config.json", "adapter_model.safetensors", "llmtrain_complete.json",
    "llmtrain_meta.json", "tokens.bin", "documents.npy", "store.json", "ids.bin", "supervised.bin", "rows.npy",
    "packs.npy", "pack_rows.npy", "positions.bin", "training_args.bin", "global_stepN_universal/", "gpu.json",
    "results.json",
    # Weights a run refuses (pickle), named in its error.
    "pytorch_model.bin", "adapter_model.bin",
    # The user's own files in the examples: data, a hostfile, a DeepSpeed env file.
    "corpus/", "web/", "code/", "notes.md", "x.bin", "reasoning.jsonl", "data/belle", "train_3.5M_CN.json",
    "mobvoi_seq_monkey_general_open_corpus.jsonl", "hostfile", ".deepspeed_env", ".swanlab/",
    # The virtual environment scripts/setup_env.sh creates.
    ".venv/",
    # Placeholders for the user's own config.
    "configs/X.yaml", "CONFIG.yaml",
    # Hugging Face Hub ids.
    "Qwen/", "BelleGroup/",
    # Other projects' files.
    "vllm/", "convert_hf_to_gguf.py",
)  # fmt: skip
# Keys of the run manifest (`data.stats.ignored_fields`), not modules, though `data` is a package name.
MANIFEST_KEYS = ("data.stats.", "data.sequence_layout")
FILE_SUFFIX = re.compile(r"\.(py|md|json|jsonl|yaml|yml|sh|txt|toml|jinja|png|safetensors|bin|npy|pt|log|parquet)$")
DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")
# In code blocks only what is unambiguous is checked: module names after `-m` and paths into the checkout.
BLOCK_NAMES = re.compile(
    r"(?:-m |\bfrom |\bimport )((?:llmtrain|bench)(?:\.\w+)*)"
    r"|\b((?:configs|llmtrain|tests|bench|scripts|docs)/[\w./{},-]+)"
)
WORDS_ABOUT_HOW_IT_WAS_MADE = re.compile(r"\bengineers?\b|\bsession's\b|\bissue \d+|\bissue-\d+", re.I)


@dataclass
class Found:
    """What :func:`check_page` looked at and what it found wrong."""

    problems: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(("path", "test", "dotted", "link"), 0))


def top_level_names() -> set[str]:
    """The package's top-level modules and subpackages (``cli``, ``data``, ...): heads of short dotted names."""
    return {path.stem for path in PACKAGE.iterdir() if path.suffix == ".py" or (path / "__init__.py").is_file()}


@functools.cache
def defined_names(path: Path) -> dict[str, set[str]]:
    """Names ``path`` defines at module level, and, under ``Class``'s key, the names its body defines."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: dict[str, set[str]] = {"": set()}

    def targets(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Assign):
            return [name.id for target in node.targets for name in ast.walk(target) if isinstance(name, ast.Name)]
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            return [node.target.id]
        if isinstance(node, ast.Import | ast.ImportFrom):
            return [(alias.asname or alias.name).split(".")[0] for alias in node.names]
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            return [node.name]
        return []

    def visit(statements: list[ast.stmt], scope: str) -> None:
        for node in statements:
            names.setdefault(scope, set()).update(targets(node))
            if isinstance(node, ast.ClassDef) and not scope:
                visit(node.body, node.name)
            for block in ("body", "orelse", "finalbody"):  # if / try / with at module level
                if not isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                    visit(getattr(node, block, []), scope)
            for handler in getattr(node, "handlers", []):
                visit(handler.body, scope)

    visit(tree.body, "")
    return names


def module_file(parts: list[str]) -> Path | None:
    relative = PROJECT_ROOT.joinpath(*parts)
    for candidate in (relative.with_suffix(".py"), relative / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def dotted_problem(name: str) -> str | None:
    """Why ``name`` (``llmtrain.a.b.symbol``, ``cli.run_cli``, ``bench.gpu_bench``) is not in the checkout, or None."""
    parts = name.split(".")
    if parts[0] not in ("llmtrain", "bench"):
        parts = ["llmtrain", *parts]
    for split in range(len(parts), 0, -1):
        path = module_file(parts[:split])
        if path is None:
            continue
        rest = parts[split:]
        defined = defined_names(path)
        if not rest:
            return None
        if rest[0] not in defined[""]:
            return f"{'.'.join(parts[:split])} defines no {rest[0]}"
        if len(rest) == 2 and rest[1] not in defined.get(rest[0], set()):
            return f"{'.'.join(parts[:split])}.{rest[0]} defines no {rest[1]}"
        return None if len(rest) <= 2 else f"cannot resolve {'.'.join(rest)} in {'.'.join(parts[:split])}"
    return "no such module"


def expand_braces(text: str) -> list[str]:
    """Shell brace expansion: ``a_{x,y}.yaml`` -> ``a_x.yaml``, ``a_y.yaml``."""
    match = re.search(r"\{([^{}]*,[^{}]*)\}", text)
    if match is None:
        return [text]
    return [
        expanded
        for option in match.group(1).split(",")
        for expanded in expand_braces(text[: match.start()] + option + text[match.end() :])
    ]


def path_problem(text: str) -> str | None:
    """Why the path ``text`` names nothing in the checkout (root, or ``llmtrain/``), or None."""
    if text.removeprefix("./").startswith(NOT_IN_CHECKOUT):
        return None
    for path in expand_braces(text):
        bare = path.rstrip("/")
        found = any(
            (base / bare).exists() or ("*" in bare and any(base.glob(bare))) for base in (PROJECT_ROOT, PACKAGE)
        )
        if not found:
            return "no such file or directory"
    return None


def named_test_problem(text: str) -> str | None:
    """Why ``tests/x.py::test_name`` names no test, or None."""
    path_text, _, name = text.partition("::")
    path = PROJECT_ROOT / path_text
    if not path.is_file():
        return "no such file"
    defined = defined_names(path)
    if name.split("::")[-1] not in set().union(*defined.values()):
        return f"{path_text} defines no {name}"
    return None


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors for the headings of a page (code blocks left out)."""
    anchors = set()
    for line in strip_blocks(text)[0].splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def strip_blocks(text: str) -> tuple[str, list[str]]:
    """The page with its fenced code blocks blanked (line numbers kept), and the blocks."""
    blocks: list[str] = []

    def blank(match: re.Match[str]) -> str:
        blocks.append(match.group(0))
        return "\n" * match.group(0).count("\n")

    return re.sub(r"^```.*?^```", blank, text, flags=re.M | re.S), blocks


def tokens_of(span: str) -> list[str]:
    """The words of a code span that could name something: split at spaces, quotes, brackets and ``=``."""
    return [word.rstrip(",;:.") for word in re.split(r"[\s\"'()\[\]=]+", span.replace("\\|", "|")) if word]


def check_name(word: str, found: Found, where: str, top: set[str]) -> None:
    """Check one word of a code span, counting what kind of name it was."""
    if not word or word.startswith(("/", "~", "$", "../", "...", "http", "-")) or any(c in word for c in "<>$"):
        return
    if re.fullmatch(r"\.[\w.-]+", word):  # a suffix (`.jsonl`) or a dot-file a run writes (`.llmtrain.lock`)
        return
    if "::" in word and ".py::" in word:
        found.counts["test"] += 1
        problem = named_test_problem(word)
    elif "/" in word or FILE_SUFFIX.search(word):
        found.counts["path"] += 1
        problem = path_problem(word)
    elif (
        DOTTED.match(word) and word.split(".")[0] in {*top, "llmtrain", "bench"} and not word.startswith(MANIFEST_KEYS)
    ):
        found.counts["dotted"] += 1
        problem = dotted_problem(word)
    else:
        return
    if problem:
        found.problems.append(f"{where}: `{word}`: {problem}")


def check_page(text: str, page: Path, found: Found) -> None:
    """Every code span, code-block name and link of ``text`` (the page at ``page``)."""
    top = top_level_names()
    prose, blocks = strip_blocks(text)
    for number, line in enumerate(prose.splitlines(), 1):
        where = f"{page.name}:{number}"
        for match in re.finditer(r"(`+)(.+?)\1", line):
            for word in tokens_of(match.group(2)):
                check_name(word, found, where, top)
        for target in re.findall(r"\]\(([^)\s]+)\)", line):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            found.counts["link"] += 1
            file_part, _, anchor = target.partition("#")
            linked = (page.parent / file_part).resolve() if file_part else page
            if not linked.exists():
                found.problems.append(f"{where}: link {target}: no such file")
            elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked.read_text("utf-8")):
                found.problems.append(f"{where}: link {target}: {linked.name} has no heading #{anchor}")
    for block in blocks:
        for module, path in BLOCK_NAMES.findall(block):
            check_name(module or path.rstrip("."), found, f"{page.name} (code block)", top)


def check_pages(pages: list[Path]) -> Found:
    found = Found()
    for page in pages:
        check_page(page.read_text(encoding="utf-8"), page, found)
    return found


def test_the_configuration_reference_is_the_generated_one() -> None:
    assert config_reference.PAGE.read_text(encoding="utf-8") == config_reference.render(), (
        f"docs/configuration.md is stale: run `{config_reference.COMMAND}`"
    )


def test_every_file_module_test_and_link_the_docs_name_exists() -> None:
    found = check_pages(PAGES)
    assert found.problems == []
    # Not vacuous: the pages name this many things of each kind (raise the floors as the docs grow).
    floors = {"path": 400, "test": 60, "dotted": 100, "link": 55}
    assert {kind: count >= floors[kind] for kind, count in found.counts.items()} == dict.fromkeys(floors, True), (
        found.counts
    )


def test_the_checker_catches_a_wrong_name_of_each_kind(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    text = (
        "Good: `configs/sft_{tiny_full,tiny_lora}.yaml`, `tests/unit/test_docs.py::test_the_checker_catches_a_wrong_"
        "name_of_each_kind`, `llmtrain.config.arguments.FieldRule`, `cli.run_cli`, `python -m llmtrain.tools.merge`,"
        " `outputs/sft-tiny-full/run_manifest.json`, [self](#a-heading).\n"
        "# A heading\n"
        "Bad: `configs/sft_tiny_{full,qlora}.yaml`, `tests/unit/test_docs.py::test_nothing`, "
        "`llmtrain.config.arguments.NoSuchRule`, `run.trainer.LlmTrainer.no_method`, `llmtrain.nowhere`, "
        "[gone](missing.md), [self](#no-such-heading).\n"
        "```bash\npython -m llmtrain.tools.nothing --model x\n```\n"
    )
    page.write_text(text, encoding="utf-8")
    found = Found()
    check_page(text, page, found)
    bad = [problem.split(": ")[1] for problem in found.problems]
    assert bad == [
        "`configs/sft_tiny_{full,qlora}.yaml`",
        "`tests/unit/test_docs.py::test_nothing`",
        "`llmtrain.config.arguments.NoSuchRule`",
        "`run.trainer.LlmTrainer.no_method`",
        "`llmtrain.nowhere`",
        "link missing.md",
        "link #no-such-heading",
        "`llmtrain.tools.nothing`",
    ], found.problems
    assert found.counts == {"path": 3, "test": 2, "dotted": 7, "link": 3}


def test_the_docs_say_nothing_about_how_the_project_was_made() -> None:
    said = [
        f"{page.name}:{number}: {match.group(0)}"
        for page in PAGES
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
        for match in WORDS_ABOUT_HOW_IT_WAS_MADE.finditer(line)
    ]
    assert said == []


def test_every_shipped_config_is_in_the_readme() -> None:
    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    named = {path for span in re.findall(r"`(configs/[^`]+\.yaml)`", readme) for path in expand_braces(span)}
    shipped = {path.relative_to(PROJECT_ROOT).as_posix() for path in (PROJECT_ROOT / "configs").glob("*.yaml")}
    assert shipped - named == set()
