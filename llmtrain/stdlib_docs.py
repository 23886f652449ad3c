"""The Python standard library's docstrings: the real English prose the embedded demo data is made of.

Read with :mod:`ast` (nothing is imported, so no module side effects), in sorted file order; used by
:mod:`llmtrain.tiny_default` (the demo corpus) and :mod:`llmtrain.demo_conversations`.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

MIN_DOCSTRING_CHARS = 200  # shorter docstrings are mostly signatures, not prose
SKIPPED_STDLIB_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages"})


def iter_stdlib_docstrings(stdlib_dir: Path, min_chars: int = MIN_DOCSTRING_CHARS) -> Iterator[dict[str, str]]:
    """Yield ``{"text", "source"}`` for each long docstring under ``stdlib_dir``, in sorted order.

    Files that do not parse are skipped; docstrings are de-duplicated by text.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp()); _ = (d / "m.py").write_text(repr("x" * 5))
    >>> list(iter_stdlib_docstrings(d, min_chars=3))
    [{'text': 'xxxxx', 'source': 'm.py'}]
    """
    seen: set[str] = set()
    for path in sorted(stdlib_dir.rglob("*.py")):
        relative = path.relative_to(stdlib_dir)
        if SKIPPED_STDLIB_DIRS.intersection(relative.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes: list[ast.AST] = [tree]
        nodes += [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)]
        for node in nodes:
            text = ast.get_docstring(node, clean=True)  # type: ignore[arg-type]
            if text is None or len(text) < min_chars or text in seen:
                continue
            seen.add(text)
            name = getattr(node, "name", "")
            yield {"text": text, "source": f"{relative.as_posix()}{':' + name if name else ''}"}
