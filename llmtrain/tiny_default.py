"""The embedded tiny default: demo corpus, tokenizer and model config, built offline.

Everything a fresh machine needs to run ``bash pretrain.sh`` with no network ships inside the
package under ``llmtrain/assets``. This module is how those files were made, and how to remake
them::

    python -m llmtrain.tiny_default          # rewrites llmtrain/assets/{demo,tiny}

* The demo corpus is real English prose: the docstrings of the Python standard library, read
  with :mod:`ast` (nothing is imported, so no module side effects), in sorted file order.
* The tokenizer is a byte-level BPE trained here on that corpus with Qwen2's normaliser and
  pre-tokeniser, Qwen's special tokens and a ChatML chat template written for this project.
* The model config is a 4-layer Qwen2 small enough to train on one CPU core in minutes.
"""

from __future__ import annotations

import json
import logging
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from llmtrain.demo_conversations import build_demo_conversations
from llmtrain.paths import DEMO_CONVERSATIONS_PATH, DEMO_CORPUS_PATH, TINY_MODEL_DIR
from llmtrain.stdlib_docs import iter_stdlib_docstrings

logger = logging.getLogger(__name__)


ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Qwen2.5's order, so ids 0..2 after the BPE vocabulary mirror the real tokenizer's layout.
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

# ChatML as Qwen uses it, written for this project: no default system prompt is injected.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

TINY_VOCAB_SIZE = 4096  # small enough that the embedding does not dominate a 4-layer model
DEMO_CORPUS_MAX_CHARS = 2_500_000  # ~700k tokens: a few epochs' worth for a two-minute CPU run


def build_demo_corpus(path: Path, max_chars: int = DEMO_CORPUS_MAX_CHARS) -> int:
    """Write the demo corpus as JSON lines to ``path``; return the number of documents."""
    stdlib_dir = Path(sysconfig.get_paths()["stdlib"])
    total_chars = 0
    count = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for record in iter_stdlib_docstrings(stdlib_dir):
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
            total_chars += len(record["text"])
            if total_chars >= max_chars:
                break
    logger.info("wrote %d documents (%d characters) to %s", count, total_chars, path)
    return count


def train_tokenizer(texts: Iterable[str], vocab_size: int = TINY_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train a Qwen2-style byte-level BPE on ``texts`` and return it with the chat template set.

    The special tokens take the last ids, as in Qwen2.5; ``eos`` and ``pad`` are
    ``<|endoftext|>`` (a base model's convention) and there is no BOS token.
    """
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_model_config(tokenizer: PreTrainedTokenizerFast) -> Qwen2Config:
    """The tiny Qwen2 architecture: 4 layers, hidden 128, GQA 4:2, tied embeddings."""
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        use_cache=True,
    )


def read_corpus_texts(path: Path) -> Iterator[str]:
    """Yield the ``text`` field of each JSON line in ``path``."""
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            yield json.loads(line)["text"]


def main() -> None:
    """Rebuild every embedded asset from the standard library of the running Python."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    build_demo_corpus(DEMO_CORPUS_PATH)
    tokenizer = train_tokenizer(read_corpus_texts(DEMO_CORPUS_PATH))
    tokenizer.save_pretrained(TINY_MODEL_DIR)
    tiny_model_config(tokenizer).save_pretrained(TINY_MODEL_DIR)
    logger.info("wrote tokenizer (%d tokens) and model config to %s", len(tokenizer), TINY_MODEL_DIR)
    build_demo_conversations(DEMO_CONVERSATIONS_PATH)


if __name__ == "__main__":
    main()
