"""The run manifest: versions, commit, config without secrets, data fingerprints."""

from __future__ import annotations

import json
from pathlib import Path

from llmtrain.run.manifest import git_commit, package_versions, run_manifest, write_manifest


def test_manifest_records_versions_commit_config_and_data(tmp_path: Path) -> None:
    data = {"stats": {"train_blocks": 3}, "sources": {"train": [{"path": "/d/a.jsonl", "size": 9}]}}
    manifest = run_manifest({"learning_rate": 0.001}, tmp_path / "tok", data, "abc")
    write_manifest(tmp_path, manifest, global_step=12)
    saved = json.loads((tmp_path / "run_manifest.json").read_text())
    assert saved["global_step"] == 12
    assert saved["config"] == {"learning_rate": 0.001}
    assert saved["packages"]["torch"] == package_versions()["torch"] is not None
    assert saved["data"]["sources"]["train"][0]["size"] == 9 and saved["data"]["path"] == str(tmp_path / "tok")
    assert not list(tmp_path.glob(".*tmp"))


def test_git_commit_is_a_hash_here_and_none_outside_a_checkout(tmp_path: Path) -> None:
    commit = git_commit()
    if commit is not None:  # a source checkout (CI's clone is one)
        assert len(commit.split("-")[0]) == 40
    assert git_commit(tmp_path) is None
