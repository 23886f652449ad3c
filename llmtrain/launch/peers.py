"""Node loss under ``NNODES``: each node's launcher watches the other nodes' launchers through their control files.

Every launcher beats in ``<output_dir>/logs/.control/node<N>-<id>/control`` (:mod:`llmtrain.supervision`)
on the filesystem all nodes share. A node is *present* once its heartbeat has been seen to move
during this launch, and *lost* when, present, its launcher's process is gone (seen at once from the
same host), its heartbeat has not moved for ``NODE_TIMEOUT_S`` seconds (this host's clock), or its
launcher has ended (``ended`` state, or its control directory removed) while this node's job still
runs. The launcher then says so in one line, stops its own ranks, and never restarts the job: a
restart without every node would wait in torchrun's rendezvous for a node that is not coming.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llmtrain.supervision import CONTROL_FILE, ENDED, ControlRecord, Silence, read_control


@dataclass
class PeerLoss:
    """One lost node: which, who its launcher was, and why it counts as lost."""

    node: int
    record: ControlRecord
    why: str
    ended: bool  # its launcher exited (its ranks may have finished or stopped too), rather than vanished

    def line(self, timeout_s: float) -> str:
        """The launcher's one-line report: the node, why, and what to do."""
        return (
            f"launch: node {self.node} ({self.record.describe()}) is lost: {self.why} (NODE_TIMEOUT_S="
            f"{timeout_s:.0f}). The job cannot go on without it: this node stops its ranks and does not restart. "
            f"Bring node {self.node} back (or replace it), then rerun the same command on every node: it resumes "
            "from the newest complete checkpoint"
        )


@dataclass
class _Peer:
    directory: Path
    silence: Silence = field(default_factory=Silence)
    first_key: tuple[str, int] | None = None
    record: ControlRecord | None = None
    present: bool = False
    vanished: bool = False


class PeerWatch:
    """The other nodes' launchers, read each :meth:`poll` (module docstring)."""

    def __init__(self, control_root: Path, node_rank: int, nnodes: int, own_directory: Path) -> None:
        self.control_root = control_root
        self.node_rank = node_rank
        self.nnodes = nnodes
        self.own_directory = own_directory
        self.peers: dict[Path, _Peer] = {}

    def _node_of(self, directory: Path) -> int | None:
        name = directory.name
        if not name.startswith("node") or "-" not in name:
            return None
        number = name[4:].split("-", 1)[0]
        return int(number) if number.isdigit() else None

    def poll(self, now: float) -> None:
        """Read every other node's control file once."""
        directories = set(self.control_root.glob("node*-*")) if self.control_root.is_dir() else set()
        for directory in directories | set(self.peers):
            node = self._node_of(directory)
            if directory == self.own_directory or node is None or node == self.node_rank or node >= self.nnodes:
                continue
            peer = self.peers.setdefault(directory, _Peer(directory))
            if not (directory / CONTROL_FILE).exists():
                peer.vanished = peer.present
                continue
            record = read_control(directory)
            peer.silence.observe(record, now)
            if record is None:
                continue
            key = (record.launch_id, record.beat)
            if peer.first_key is None:
                peer.first_key = key
            elif key != peer.first_key:
                peer.present = True
            peer.record = record

    def losses(self, now: float, timeout_s: float) -> list[PeerLoss]:
        """The present nodes that count as lost now, one per node (a node with one live launcher is not lost)."""
        lost: dict[int, PeerLoss] = {}
        alive: set[int] = set()
        for peer in self.peers.values():
            node = self._node_of(peer.directory)
            if not peer.present or peer.record is None or node is None:
                continue
            loss = self._loss(node, peer, now, timeout_s)
            if loss is None:
                alive.add(node)
            else:
                lost.setdefault(node, loss)
        return [lost[node] for node in sorted(lost) if node not in alive]

    @staticmethod
    def _loss(node: int, peer: _Peer, now: float, timeout_s: float) -> PeerLoss | None:
        record = peer.record
        assert record is not None
        if peer.vanished or record.state == ENDED:
            code = f" (exit {record.exit_code})" if record.exit_code is not None else ""
            return PeerLoss(node, record, f"its launcher has ended{code}", ended=True)
        if record.launcher_gone():
            return PeerLoss(node, record, "its launcher is no longer running", ended=False)
        if peer.silence.seconds(now) > timeout_s:
            why = f"no heartbeat from its launcher for over {timeout_s:.0f} s"
            return PeerLoss(node, record, why, ended=False)
        return None

    def all_alive(self, now: float, recent_s: float) -> bool:
        """Whether every present node's launcher has beaten within ``recent_s`` seconds and has not ended."""
        return all(
            not peer.vanished and peer.record is not None and peer.record.state != ENDED
            and peer.silence.seconds(now) <= recent_s
            for peer in self.peers.values()
            if peer.present
        )  # fmt: skip
