"""Whether an attempt made progress: a complete checkpoint it wrote itself, judged by the ranks' own rule.

Complete means what resume means (:func:`llmtrain.run.completeness.checkpoint_problem`, the same
check :func:`~llmtrain.run.checkpoints.find_resume_checkpoint` makes; standard library only, so the
launcher never imports the training stack). What the launcher records before an attempt is cheap:
which checkpoints already carried a completion marker, and which marker file it was. The attempt
made progress when the newest complete checkpoint afterwards carries a marker that was not there
before it began.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from llmtrain.run.completeness import CHECKPOINT_PATTERN, COMPLETE_MARKER, checkpoint_problem, list_checkpoints


def marker_identities(output_dir: Path) -> dict[int, tuple[int, int, int]]:
    """``{step: (device, inode, mtime in ns)}`` of every checkpoint's completion marker in ``output_dir``."""
    found: dict[int, tuple[int, int, int]] = {}
    if not output_dir.is_dir():
        return found
    for entry in os.scandir(output_dir):
        match = CHECKPOINT_PATTERN.match(entry.name)
        if match is None:
            continue
        try:
            stat = os.stat(Path(entry.path) / COMPLETE_MARKER)
        except OSError:
            continue
        found[int(match.group(1))] = (stat.st_dev, stat.st_ino, stat.st_mtime_ns)
    return found


def newest_complete_step(output_dir: Path) -> int | None:
    """The step of the newest checkpoint a resume would take, or None."""
    for checkpoint in list_checkpoints(output_dir):
        if checkpoint_problem(checkpoint, verify_checksums=True) is None:
            return int(checkpoint.name.rsplit("-", 1)[1])
    return None


def describe_step(step: int | None) -> str:
    """``step N``, or what to say when there is none.

    >>> describe_step(12), describe_step(None)
    ('step 12', 'no complete checkpoint yet')
    """
    return f"step {step}" if step is not None else "no complete checkpoint yet"


def resume_text(step: int | None) -> str:
    """What a rerun does, in words.

    >>> resume_text(12), resume_text(None)
    ('it resumes from step 12', 'there is no complete checkpoint yet: it starts from step 0')
    """
    return (
        f"it resumes from step {step}"
        if step is not None
        else "there is no complete checkpoint yet: it starts from step 0"
    )


@dataclass(frozen=True)
class Progress:
    """The checkpoints before an attempt, to judge what it left behind."""

    output_dir: Path
    before: dict[int, tuple[int, int, int]]

    @classmethod
    def before_attempt(cls, output_dir: Path) -> Progress:
        return cls(output_dir, marker_identities(output_dir))

    def after_attempt(self) -> tuple[int | None, bool]:
        """``(newest complete step, whether this attempt wrote it)``."""
        step = newest_complete_step(self.output_dir)
        if step is None:
            return None, False
        return step, marker_identities(self.output_dir).get(step) != self.before.get(step)
