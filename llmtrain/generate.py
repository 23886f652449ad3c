"""Sample a continuation from a trained model directory (a smoke test for a finished run).

python -m llmtrain.generate --model outputs/pretrain-tiny --prompt "Return the"
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def generate_text(model_dir: str, prompt: str, max_new_tokens: int, seed: int) -> str:
    """Sample ``max_new_tokens`` after ``prompt`` (top-p 0.9, temperature 0.8); stops at EOS."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True)
    model.eval()
    torch.manual_seed(seed)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.8, top_p=0.9)
    return str(tokenizer.decode(output[0], skip_special_tokens=True))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model directory written by pretrain.py")
    parser.add_argument("--prompt", default="Return the", help="text to continue")
    parser.add_argument("--max_new_tokens", type=int, default=48, help="length of the continuation")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    args = parser.parse_args(argv)
    sys.stdout.write(generate_text(args.model, args.prompt, args.max_new_tokens, args.seed) + "\n")


if __name__ == "__main__":
    main()
