"""The embedded demo SFT set: questions and answers about the Python standard library, built offline.

``llmtrain/assets/demo/sft_conversations.jsonl`` is made by this module from the docstrings of
the running Python's standard library (read with :mod:`ast` through
:func:`~llmtrain.stdlib_docs.iter_stdlib_docstrings`; nothing is imported), in Belle/ShareGPT
format. Remake it with::

    python -m llmtrain.demo_conversations

Kinds of turn, each answer a docstring's first paragraph or a fixed sentence::

    What does `json.dumps` do?              -> Serialize ``obj`` to a JSON formatted ``str``. ...
    What is the `json` module for?          -> JSON (JavaScript Object Notation) ... is a subset of ...
    Which module defines `JSONDecoder`?     -> `JSONDecoder` is defined in the `json.decoder` module.

Some conversations chain two or three questions about one module, and some open with a system
turn. The output is the same for a given Python version: files are read in sorted order and
every choice comes from a seeded generator.
"""

from __future__ import annotations

import ast
import json
import logging
import random
import re
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from llmtrain.paths import DEMO_CONVERSATIONS_PATH
from llmtrain.stdlib_docs import SKIPPED_STDLIB_DIRS, iter_stdlib_docstrings

logger = logging.getLogger(__name__)

DEMO_CONVERSATIONS_LIMIT = 2000  # a few minutes of CPU fine-tuning for the tiny model
MAX_ANSWER_CHARS = 400  # short answers, so the tiny model can learn them on CPU
MIN_ANSWER_WORDS = 4  # shorter first paragraphs are mostly stubs ("Deprecated.")
MIN_DOCSTRING_CHARS = 40  # below this a docstring rarely says more than the name does
SYSTEM_PROMPT = "You are a concise assistant for the Python standard library."
SYSTEM_SHARE = 0.3  # share of conversations that open with the system turn
TURN_COUNT_WEIGHTS = {1: 6, 2: 3, 3: 1}  # questions per conversation -> relative frequency
SEED = 20240601
# Editor, GUI, 2to3 and demo internals describe widgets and fixers, not library APIs; the codecs
# under encodings/ share one generated docstring.
SKIPPED_PACKAGES = frozenset(
    {"idlelib", "lib2to3", "tkinter", "turtledemo", "distutils", "ensurepip", "pydoc_data", "encodings"}
)
SIGNATURE = re.compile(r"^[\w.]+\(.*\)")  # C-style docstrings open with "name(args) -> result"
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")

MODULE_QUESTIONS = ("What is the `{name}` module for?", "What does the `{name}` module provide?")
FUNCTION_QUESTIONS = ("What does `{name}` do?", "What is `{name}` used for?")
CLASS_QUESTIONS = ("What is `{name}`?", "What is the `{name}` class for?")
LOCATION_QUESTION = "Which module defines `{name}`?"
LOCATION_ANSWER = "`{name}` is defined in the `{module}` module."


@dataclass(frozen=True)
class Definition:
    """A public function, class or method of a module, with the docstring ``ast`` found for it."""

    qualname: str  # "dumps", "JSONDecoder", "JSONDecoder.decode"
    kind: str  # "function" or "class"
    docstring: str


@dataclass(frozen=True)
class Fact:
    """One question and its answer."""

    question: str
    answer: str


@dataclass
class ModuleFacts:
    """What is known about one module: what it is for (asked first), then its definitions."""

    overview: Fact | None = None
    details: list[Fact] = field(default_factory=list)


def first_paragraph(docstring: str, max_chars: int = MAX_ANSWER_CHARS) -> str | None:
    """The docstring's first paragraph on one line, cut to whole sentences within ``max_chars``.

    ``None`` when there is no usable answer: a signature line, a doctest, a stub of a few words,
    or a first sentence longer than ``max_chars``.

    >>> first_paragraph("Return the sum of a and b.\\nBoth must be numbers.\\n\\nDetails follow.")
    'Return the sum of a and b. Both must be numbers.'
    >>> first_paragraph("Exception raised by this module. Use:\\n\\n    raise Error(msg)")
    'Exception raised by this module.'
    >>> first_paragraph("add(a, b) -> number") is None
    True
    """
    paragraph = " ".join(docstring.strip().split("\n\n")[0].split())
    if SIGNATURE.match(paragraph) or ">>>" in paragraph:
        return None
    kept = ""
    for sentence in SENTENCE_END.split(paragraph):
        # A sentence ending in ":" introduces an example or list that the answer would lack.
        if sentence.endswith(":") or len(kept) + len(sentence) + 1 > max_chars:
            break
        kept = f"{kept} {sentence}" if kept else sentence
    return kept if len(kept.split()) >= MIN_ANSWER_WORDS else None


def module_name(relative: str) -> str | None:
    """Dotted module name of a stdlib file path, or ``None`` for private, skipped or test modules.

    >>> module_name("json/__init__.py"), module_name("json/decoder.py"), module_name("_pyio.py")
    ('json', 'json.decoder', None)
    """
    parts = relative.removesuffix(".py").split("/")
    if parts[-1] == "__init__":
        parts.pop()
    if not parts or parts[0] in SKIPPED_PACKAGES or SKIPPED_STDLIB_DIRS.intersection(parts):
        return None
    if any(part.startswith("_") or not part.isidentifier() for part in parts):
        return None
    return ".".join(parts)


def public_definitions(source: str) -> list[Definition]:
    """Public top-level functions and classes of a module's source, and the public methods of those classes.

    >>> [(d.qualname, d.kind) for d in public_definitions("class A:\\n    def f(self): pass\\ndef _g(): pass")]
    [('A', 'class'), ('A.f', 'function')]
    """
    definitions: list[Definition] = []
    for node in ast.parse(source).body:
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) or node.name.startswith("_"):
            continue
        kind = "class" if isinstance(node, ast.ClassDef) else "function"
        definitions.append(Definition(node.name, kind, ast.get_docstring(node, clean=True) or ""))
        if isinstance(node, ast.ClassDef):
            for method in node.body:
                if isinstance(method, ast.FunctionDef | ast.AsyncFunctionDef) and not method.name.startswith("_"):
                    docstring = ast.get_docstring(method, clean=True) or ""
                    definitions.append(Definition(f"{node.name}.{method.name}", "function", docstring))
    return definitions


def collect_module_facts(stdlib_dir: Path, rng: random.Random) -> dict[str, ModuleFacts]:
    """Questions and answers per public module under ``stdlib_dir``, modules in sorted file order.

    A docstring becomes a fact only when it belongs to the module itself, to one of its public
    top-level definitions or to a public method of those classes (nested helpers are left out:
    their dotted name would be wrong). "Which module defines X?" is asked only for described
    top-level names that no other file under ``stdlib_dir`` defines at top level.
    """
    facts: dict[str, ModuleFacts] = {}
    defined_in: dict[str, set[str]] = {}  # top-level name -> files defining it (private too)
    current_file = ""
    definitions: list[Definition] = []
    described: list[tuple[str, str]] = []  # (module, top-level name) with an answer, in file order
    for record in iter_stdlib_docstrings(stdlib_dir, min_chars=MIN_DOCSTRING_CHARS):
        relative, _, name = record["source"].partition(":")
        if relative != current_file:
            current_file = relative
            definitions = public_definitions((stdlib_dir / relative).read_text(encoding="utf-8"))
            for definition in definitions:
                if "." not in definition.qualname:
                    defined_in.setdefault(definition.qualname, set()).add(relative)
        module = module_name(relative)
        if module is None:
            continue
        answer = first_paragraph(record["text"])
        if answer is None:
            continue
        if not name:
            question = rng.choice(MODULE_QUESTIONS).format(name=module)
            facts.setdefault(module, ModuleFacts()).overview = Fact(question, answer)
            continue
        matches = [d for d in definitions if d.qualname.split(".")[-1] == name and d.docstring == record["text"]]
        if len(matches) != 1:
            continue
        templates = CLASS_QUESTIONS if matches[0].kind == "class" else FUNCTION_QUESTIONS
        question = rng.choice(templates).format(name=f"{module}.{matches[0].qualname}")
        facts.setdefault(module, ModuleFacts()).details.append(Fact(question, answer))
        if "." not in matches[0].qualname:
            described.append((module, name))
    for module, name in described:
        if len(defined_in[name]) == 1:
            answer = LOCATION_ANSWER.format(name=name, module=module)
            facts[module].details.append(Fact(LOCATION_QUESTION.format(name=name), answer))
    return facts


def conversations_from_facts(
    facts: dict[str, ModuleFacts], rng: random.Random, limit: int
) -> list[list[dict[str, str]]]:
    """Group each module's facts into conversations of 1-3 questions; keep a seeded sample of ``limit``, in order.

    Each conversation is a ShareGPT turn list (``from`` = system / human / gpt).
    """
    conversations: list[list[dict[str, str]]] = []
    turn_counts, weights = list(TURN_COUNT_WEIGHTS), list(TURN_COUNT_WEIGHTS.values())
    for module_facts in facts.values():
        remaining = list(module_facts.details)
        rng.shuffle(remaining)
        if module_facts.overview:
            remaining.insert(0, module_facts.overview)
        while remaining:
            count = rng.choices(turn_counts, weights)[0]
            chosen, remaining = remaining[:count], remaining[count:]
            turns = [{"from": "system", "value": SYSTEM_PROMPT}] if rng.random() < SYSTEM_SHARE else []
            for fact in chosen:
                turns += [{"from": "human", "value": fact.question}, {"from": "gpt", "value": fact.answer}]
            conversations.append(turns)
    if len(conversations) > limit:
        kept = sorted(rng.sample(range(len(conversations)), limit))
        conversations = [conversations[index] for index in kept]
    return conversations


def build_demo_conversations(
    path: Path, limit: int = DEMO_CONVERSATIONS_LIMIT, *, stdlib_dir: Path | None = None
) -> int:
    """Write at most ``limit`` demo conversations as ShareGPT JSON lines to ``path``; return how many.

    ``stdlib_dir`` defaults to the running Python's standard library.
    """
    stdlib_dir = stdlib_dir or Path(sysconfig.get_paths()["stdlib"])
    rng = random.Random(SEED)
    conversations = conversations_from_facts(collect_module_facts(stdlib_dir, rng), rng, limit)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for turns in conversations:
            out.write(json.dumps({"conversations": turns}, ensure_ascii=False) + "\n")
    multi_turn = sum(sum(turn["from"] == "human" for turn in turns) > 1 for turns in conversations)
    with_system = sum(turns[0]["from"] == "system" for turns in conversations)
    logger.info(
        "wrote %d conversations (%d multi-turn, %d with a system turn, %d bytes) to %s",
        len(conversations),
        multi_turn,
        with_system,
        path.stat().st_size,
        path,
    )
    return len(conversations)


def main() -> None:
    """Rebuild the demo SFT set from the standard library of the running Python."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    build_demo_conversations(DEMO_CONVERSATIONS_PATH)


if __name__ == "__main__":
    main()
