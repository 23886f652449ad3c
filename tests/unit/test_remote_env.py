"""The remote ranks' env file under ``HOSTFILE`` holds no credential: named in one line, never valued.

DeepSpeed's runner turns each line of that file into ``export KEY=VALUE;`` on the pdsh command line,
which ``ps`` shows and the runner logs (:mod:`llmtrain.launch.remote_env`).
"""

from __future__ import annotations

import os
from pathlib import Path

from llmtrain.launch.remote_env import runner_environment, write_remote_env

CREDENTIALS = {
    "HF_TOKEN": "hf_remoteSecret1",
    "HUGGING_FACE_HUB_TOKEN": "hf_remoteSecret2",  # no job prefix: never forwarded, so not named either
    "SWANLAB_API_KEY": "sk-remote-secret-3",
    "WANDB_API_KEY": "wandb-remote-secret-4",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-remote-secret-5",  # DeepSpeed's runner exports MLFLOW* itself
}
JOB_SETTINGS = {
    "HF_HOME": "/data/hf",
    "HF_TOKEN_PATH": "/data/hf/token",  # where the token is stored, not the token
    "SWANLAB_PROJECT": "my project",
    "TOKENIZERS_PARALLELISM": "false",
    "NCCL_SOCKET_IFNAME": "ib0",
}
USER_SECRET = "db-remote-secret-6"


def test_credentials_stay_out_of_the_env_file_and_are_named_without_their_values(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    user_file = home / ".deepspeed_env"
    user_file.write_text(f"MY_CLUSTER_SETTING=mine\nDB_PASSWORD={USER_SECRET}\n")
    env = {"HOME": str(home), "PATH": "/usr/bin", **CREDENTIALS, **JOB_SETTINGS}

    remote = write_remote_env(env, tmp_path, os.getpid())

    written = remote.path.read_text()
    assert [line.split("=", 1)[0] for line in written.splitlines()] == [*sorted(JOB_SETTINGS), "MY_CLUSTER_SETTING"]
    withheld = ["HF_TOKEN", "MLFLOW_TRACKING_PASSWORD", "SWANLAB_API_KEY", "WANDB_API_KEY"]
    assert remote.withheld == [*withheld, f"DB_PASSWORD (from {user_file})"]
    line = remote.withheld_line()
    assert line is not None and line.startswith(
        f"launch: credentials not passed to the remote ranks: {' '.join(withheld)} DB_PASSWORD (from {user_file}) "
        "(DeepSpeed's runner would put them on the pdsh command line, which ps shows and it logs); log in on each "
        "host instead (`hf auth login`"
    )
    for secret in (*CREDENTIALS.values(), USER_SECRET):
        assert secret not in written and secret not in line and secret not in remote.summary()
    assert user_file.read_text() == f"MY_CLUSTER_SETTING=mine\nDB_PASSWORD={USER_SECRET}\n"  # the user's own, as it was


def test_without_credentials_there_is_no_withheld_line(tmp_path: Path) -> None:
    remote = write_remote_env({"HOME": str(tmp_path), **JOB_SETTINGS}, tmp_path, os.getpid())
    assert remote.withheld == [] and remote.withheld_line() is None
    assert len(remote.path.read_text().splitlines()) == len(JOB_SETTINGS)


def test_the_runner_starts_without_the_credentials_it_would_export_itself() -> None:
    env = {"PATH": "/usr/bin", "PYTHONPATH": "/repo", "MLFLOW_TRACKING_URI": "http://mlflow", **CREDENTIALS}
    started_with = runner_environment(env)
    assert "MLFLOW_TRACKING_PASSWORD" not in started_with
    # The rest stays: the runner never exports these, and with one host its local ranks inherit them.
    assert started_with == {name: value for name, value in env.items() if name != "MLFLOW_TRACKING_PASSWORD"}
