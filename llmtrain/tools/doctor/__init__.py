"""The preflight the launchers run before every start; usage and checks: :mod:`llmtrain.tools.doctor.cli`."""

from llmtrain.tools.doctor.cli import main
from llmtrain.tools.doctor.diagnosis import diagnose
from llmtrain.tools.doctor.report import ERROR, OK, WARNING, Finding, PreflightError

__all__ = ["ERROR", "OK", "WARNING", "Finding", "PreflightError", "diagnose", "main"]
