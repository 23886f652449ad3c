"""Trainer step overhead: our pretraining Trainer's step time vs a bare PyTorch loop, same model and batches.

    python -m bench.trainer_overhead [--steps 16]

Model: a Qwen2 (hidden 256, 4 layers, GQA 4:2, MLP 1024, the tiny tokenizer's 4,096-token
vocabulary), fp32, blocks of 256 tokens, micro-batch 8 -- a step is a few hundred milliseconds
on a 2-core CPU, long enough that overhead is measurable and short enough to repeat.

* **ours**: ``llmtrain.run.trainer.build_trainer`` (the Trainer subclass and callbacks every run
  gets: step guard, data ledger, checkpoint marker, perplexity, the throughput accounting of
  ``llmtrain.loss`` and its chunked loss), single process, ``use_cpu``,
  no DeepSpeed, logging every 10 steps, gradient clipping at 1.0 and the LR schedule as shipped;
* **bare**: ``for batch: loss = model(**batch).loss; loss.backward(); opt.step(); opt.zero_grad()``
  with the same AdamW flavour the Trainer builds.

The two alternate step by step (a callback runs one bare step on a copy of the model after each
Trainer step): ours is the interval from the end of that bare step to the Trainer's next step end
(data loading, logging, callbacks included), bare is the bare step itself. Reported: the median of
the paired ratios (adjacent steps see the same machine load), and both medians. Target: <= 1.10.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from typing import Any

import datasets
import numpy as np
import torch
from transformers import AutoTokenizer, PrinterCallback, Qwen2Config, Qwen2ForCausalLM, TrainerCallback

from bench.common import Result, median, print_result, set_threads
from llmtrain.config.arguments import TrainArguments
from llmtrain.data.pretrain import collate_blocks
from llmtrain.paths import TINY_MODEL_DIR
from llmtrain.run.trainer import build_trainer

BLOCK_SIZE = 256
MICRO_BATCH = 8
LOGGING_STEPS = 10  # the shipped configs' value
TARGET = 1.10


def overhead_model() -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=BLOCK_SIZE,
        tie_word_embeddings=True,
        use_cache=False,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa")


class BareStepBetweenSteps(TrainerCallback):
    """Interleaves at step granularity: after each Trainer step, one bare step on a copy of the model.

    ``ours`` gets the interval from the end of the bare step to the Trainer's next step end (its
    data loading, logging and callbacks included); ``bare`` gets the bare step's own time. Adjacent
    steps see the same machine load, which a shared 2-core box needs.
    """

    def __init__(self, model: Qwen2ForCausalLM, blocks: np.ndarray, fused: bool) -> None:
        self.model = copy.deepcopy(model).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=3.0e-4, fused=fused)
        self.blocks = blocks
        self.ours: list[float] = []
        self.bare: list[float] = []
        self._resumed_at: float | None = None

    def bare_step(self, step: int) -> None:
        rows = self.blocks[(step * MICRO_BATCH) % len(self.blocks) :][:MICRO_BATCH]
        batch = collate_blocks([{"input_ids": row} for row in rows])
        self.model(**batch).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        now = time.perf_counter()
        if self._resumed_at is not None:
            self.ours.append(now - self._resumed_at)
        self.bare_step(state.global_step)
        done = time.perf_counter()
        if self._resumed_at is not None:
            self.bare.append(done - now)
        self._resumed_at = done


def run(steps: int = 16) -> Result:
    set_threads()
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 4096, size=((steps + 2) * MICRO_BATCH, BLOCK_SIZE), dtype=np.int64)
    model = overhead_model()
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainArguments(
            output_dir=tmp,
            use_cpu=True,
            max_steps=steps + 1,
            per_device_train_batch_size=MICRO_BATCH,
            learning_rate=3.0e-4,
            logging_steps=LOGGING_STEPS,
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        fused = "fused" in str(getattr(args.optim, "value", args.optim))
        interleave = BareStepBetweenSteps(model, blocks, fused)
        dataset = datasets.Dataset.from_dict({"input_ids": blocks.tolist()})
        manifest = {"config": {"block_size": BLOCK_SIZE}, "run_id": "bench-trainer-overhead"}
        trainer = build_trainer(model, tokenizer, args, dataset, None, collate_blocks, manifest, BLOCK_SIZE)
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(interleave)
        trainer.train()
    ours, bare = interleave.ours, interleave.bare
    paired = [o / b for o, b in zip(ours, bare, strict=True)]
    logged = [entry for entry in trainer.state.log_history if "tokens_per_second" in entry]
    detail = {
        "model": "Qwen2 h256 L4 GQA 4:2 vocab 4096, fp32",
        "tokens_per_step": MICRO_BATCH * BLOCK_SIZE,
        "optimizer": f"AdamW fused={fused} (the Trainer's default {args.optim})",
        "steps_compared": len(paired),
        "ours_median_step_ms": round(1000 * median(ours), 1),
        "bare_median_step_ms": round(1000 * median(bare), 1),
        "ratio_of_medians": round(median(ours) / median(bare), 3),
        "paired_ratios_p25_p75": [round(float(q), 3) for q in np.percentile(paired, [25, 75])],
        "logged_by_ThroughputCallback": {k: v for k, v in (logged[-1] if logged else {}).items() if k != "epoch"},
    }
    return Result("Trainer step time, ours / bare loop", median(paired), TARGET, False, detail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=16, help="timed steps per side")
    args = parser.parse_args()
    result = run(args.steps)
    print_result(result)


if __name__ == "__main__":
    main()
