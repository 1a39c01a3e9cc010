"""Several learner ranks behind one gRPC service: rank 0 leads, the other ranks follow.

The learner is data parallel under DeepSpeed: every rank holds the policy (or its ZeRO shard)
and every update, export and checkpoint is a collective that all ranks must enter in the same
order with the same inputs. Only rank 0 talks to the rollout workers, so only rank 0 knows what
comes next. This module keeps the ranks in step without a second protocol:

- rank 0 wraps its ``Learner`` in ``LeadLearner``, which announces each collective call (the
  method name and its arguments, e.g. the step's trajectories) to the other ranks with one
  ``broadcast_object_list`` before making it itself;
- every other rank runs ``follow``: receive a call, make the same call on its own ``Learner``,
  repeat until rank 0 announces the end.

The announcements travel on their own gloo group with a long timeout: a follower waits there
for the next step as long as the rollouts take, while the default group keeps DeepSpeed's
timeout for the collectives themselves. A rank that dies ends the others through the launcher
(torchrun stops the whole group), and the group restarts together.

Checkpoints span pods. Every rank writes its ZeRO shards and RNG state into the directory rank 0
announces. A pod that sees that directory shares rank 0's filesystem (one machine, ``flowlane
run``) and has nothing more to do. A pod that does not (learner pods on Kubernetes) writes into a
directory of its own at that path; its first rank uploads the pod's files to the checkpoint store
as parts of the step (``CheckpointStore.save_part``) and reports them to rank 0, whose ``save``
then commits one manifest naming every file. Loading mirrors it: such a pod fetches the
checkpoint's shared files and its own ranks' shards from the store before its ranks load.

It also holds what the learner's engine needs to run on the ranks: ``ensure_distributed`` (the
process group, a single local rank when no launcher set one up), ``rank_share`` (which of an
update's micro-batches a rank runs) and ``uneven_shards`` (the parameters ZeRO-3 cannot split).
"""

from __future__ import annotations

import datetime
import enum
import logging
import os
import re
import shutil
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from flowlane.api.errors import FlowlaneError
from flowlane.api.trajectory import Trajectory
from flowlane.kit.checkpoints import DEEPSPEED_DIR, CheckpointError, CheckpointStore, ManifestFile
from flowlane.kit.lora import STATE_FILE

log = logging.getLogger(__name__)

#: How long a follower waits for rank 0's next call (a step's rollouts, an evaluation round).
ANNOUNCE_TIMEOUT_S = float(os.environ.get("FLOWLANE_LEARNER_ANNOUNCE_TIMEOUT_S", 24 * 3600))


class Call(enum.StrEnum):
    STEP = "step"
    EXPORT = "export_weights"
    EXPORT_POLICY = "export_policy"
    SAVE = "save_checkpoint_files"
    LOAD = "load_checkpoint_files"
    END = "end"


class RankChannel:
    """Rank 0's announcements to the other ranks (a gloo group of its own)."""

    def __init__(self, timeout_s: float = ANNOUNCE_TIMEOUT_S) -> None:
        self.group = torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))

    def announce(self, call: Call, *args: Any) -> None:
        torch.distributed.broadcast_object_list([(call.value, args)], src=0, group=self.group)

    def receive(self) -> tuple[Call, tuple[Any, ...]]:
        box: list[Any] = [None]
        torch.distributed.broadcast_object_list(box, src=0, group=self.group)
        name, args = box[0]
        return Call(name), tuple(args)

    def barrier(self) -> None:
        torch.distributed.barrier(group=self.group)

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on rank 0 (an empty list elsewhere)."""
        lead = torch.distributed.get_rank() == 0
        box: list[Any] | None = [None] * torch.distributed.get_world_size() if lead else None
        torch.distributed.gather_object(value, box, dst=0, group=self.group)
        return box or []


@dataclass(frozen=True)
class StoreTarget:
    """Checkpoint ``step`` in the store at ``uri``: where a pod without rank 0's filesystem puts
    its part of a checkpoint, or fetches it from (keys and endpoint from the pod's environment)."""

    uri: str
    step: int

    def open(self) -> CheckpointStore:
        return CheckpointStore.from_uri(self.uri, validate=False)


def pod_ranks() -> range:
    """The global ranks of this pod (torchrun node); its first one uploads and fetches for all."""
    first = int(os.environ.get("RANK", "0")) - int(os.environ.get("LOCAL_RANK", "0"))
    return range(first, first + int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


_RANK_FILE = re.compile(r"(?:zero_pp_rank_|rng_state_rank)(\d+)")


def needed_to_load(path: str, ranks: range) -> bool:
    """Whether ranks ``ranks`` read checkpoint file ``path`` on load: the metadata and DeepSpeed's
    state, without other ranks' shards and RNG states (rank 0's model files are for serving)."""
    if path == STATE_FILE:
        return True
    if not path.startswith(f"{DEEPSPEED_DIR}/"):
        return False
    match = _RANK_FILE.search(PurePosixPath(path).name)
    return match is None or int(match.group(1)) in ranks


class LeadLearner:
    """Rank 0's learner: each collective call is announced to the followers, then made.

    Everything else (``policy_version``, ``model_dir``, ``log_probs`` ...) is the wrapped
    learner's own, so the service uses this exactly like a one-rank ``Learner``.
    """

    def __init__(self, learner: Any, channel: RankChannel) -> None:
        self._learner = learner
        self._channel = channel

    def __getattr__(self, name: str) -> Any:
        return getattr(self._learner, name)

    def step(self, trajectories: Sequence[Trajectory]) -> dict[str, float]:
        self._channel.announce(Call.STEP, list(trajectories))
        metrics: dict[str, float] = self._learner.step(trajectories)
        return metrics

    def export_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        self._channel.announce(Call.EXPORT)
        yield from self._learner.export_weights()

    def export_policy(self, adapter_only: bool) -> tuple[str, list[tuple[str, torch.Tensor]]]:
        self._channel.announce(Call.EXPORT_POLICY, adapter_only)
        exported: tuple[str, list[tuple[str, torch.Tensor]]] = self._learner.export_policy(adapter_only)
        return exported

    def save_checkpoint_files(self, directory: Path) -> dict[str, Any]:
        return self.save_with_parts(directory, None)[0]

    def save_with_parts(self, directory: Path, target: StoreTarget | None) -> tuple[dict[str, Any], list[ManifestFile]]:
        """Every rank's files into ``directory``; returns the metadata and the files pods without
        this filesystem uploaded to ``target`` (for the store's ``save(..., parts=...)``)."""
        self._channel.announce(Call.SAVE, str(directory), target)
        self._channel.barrier()  # every rank has looked for the directory before anyone writes into it
        meta: dict[str, Any] = self._learner.save_checkpoint_files(Path(directory))
        parts: list[ManifestFile] = []
        for outcome in self._channel.gather([]):
            if isinstance(outcome, str):
                raise CheckpointError(outcome)
            parts += outcome
        return meta, parts

    def load_checkpoint_files(self, directory: Path) -> dict[str, Any]:
        return self.load_with_parts(directory, None)

    def load_with_parts(self, directory: Path, target: StoreTarget | None) -> dict[str, Any]:
        """Every rank loads ``directory``; pods without this filesystem fetch it from ``target`` first."""
        self._channel.announce(Call.LOAD, str(directory), target)
        self._channel.barrier()  # looked for the directory
        self._channel.barrier()  # fetched where needed
        meta: dict[str, Any] = self._learner.load_checkpoint_files(Path(directory))
        self._channel.barrier()  # read everywhere
        return meta

    def close(self) -> None:
        self._channel.announce(Call.END)
        self._learner.close()


def lead(learner: Any) -> Any:
    """The learner rank 0's service should use: itself with one rank, a ``LeadLearner`` with more."""
    if learner.world_size == 1:
        return learner
    return LeadLearner(learner, RankChannel())


def save_on_every_pod(learner: Any, directory: Path, store: CheckpointStore,
                      step: int) -> tuple[dict[str, Any], list[ManifestFile]]:
    """Checkpoint ``step``'s files from every rank: rank 0's in ``directory``, the rest already
    uploaded to ``store`` by their pods (the parts that ``store.save`` must name)."""
    if isinstance(learner, LeadLearner):
        return learner.save_with_parts(directory, StoreTarget(store.location, step))
    meta: dict[str, Any] = learner.save_checkpoint_files(directory)
    return meta, []


def load_on_every_pod(learner: Any, directory: Path, store: CheckpointStore, step: int) -> dict[str, Any]:
    """Load checkpoint ``step`` (downloaded to ``directory``) on every rank of every pod."""
    if isinstance(learner, LeadLearner):
        return learner.load_with_parts(directory, StoreTarget(store.location, step))
    meta: dict[str, Any] = learner.load_checkpoint_files(directory)
    return meta


def release_followers(learner: Any) -> None:
    """Tell the other ranks the run is over (a no-op with one rank)."""
    if isinstance(learner, LeadLearner):
        learner.close()


def follow(learner: Any, channel: RankChannel | None = None) -> int:
    """Make rank 0's calls on this rank's learner until it announces the end; returns the calls made."""
    channel = channel or RankChannel()
    made = 0
    while True:
        call, args = channel.receive()
        if call is Call.END:
            learner.close()
            return made
        made += 1
        if call is Call.STEP:
            learner.step(args[0])
        elif call is Call.EXPORT:
            # Only ZeRO-3 gathers collectively; with replicated weights rank 0 reads its own.
            if learner.config.zero_stage == 3:
                for _ in learner.export_weights():
                    pass
        elif call is Call.EXPORT_POLICY:
            if learner.config.zero_stage == 3:
                learner.export_policy(*args)
        elif call is Call.SAVE:
            _follow_save(learner, channel, Path(args[0]), args[1] if len(args) > 1 else None)
        elif call is Call.LOAD:
            _follow_load(learner, channel, Path(args[0]), args[1] if len(args) > 1 else None)


def _follow_save(learner: Any, channel: RankChannel, directory: Path, target: StoreTarget | None) -> None:
    # Rank 0 made the directory before announcing it: seeing it means sharing its filesystem.
    own_copy = not directory.is_dir()
    channel.barrier()
    learner.save_checkpoint_files(directory)  # returns once every rank has written its files
    uploads = own_copy and int(os.environ.get("LOCAL_RANK", "0")) == 0
    outcome: list[ManifestFile] | str = []
    if uploads and target is not None:
        try:
            outcome = target.open().save_part(target.step, directory)
        except (CheckpointError, FlowlaneError) as err:  # rank 0 reports it; training goes on
            outcome = f"learner ranks {list(pod_ranks())}: uploading their checkpoint files failed: {err}"
    channel.gather(outcome)
    if uploads:
        shutil.rmtree(directory, ignore_errors=True)


def _follow_load(learner: Any, channel: RankChannel, directory: Path, target: StoreTarget | None) -> None:
    own_copy = not directory.is_dir()
    channel.barrier()
    fetches = own_copy and int(os.environ.get("LOCAL_RANK", "0")) == 0
    if fetches:
        if target is None:
            raise FlowlaneError(f"learner ranks {list(pod_ranks())}: checkpoint {directory} is on another pod's "
                                "filesystem and no store was named to fetch it from")
        store, ranks = target.open(), pod_ranks()
        store.download(store.get(target.step), directory, skip=lambda path: not needed_to_load(path, ranks))
    channel.barrier()
    learner.load_checkpoint_files(directory)
    channel.barrier()
    if fetches:
        shutil.rmtree(directory, ignore_errors=True)


# --- setting up the ranks (the learner engine calls these) ---------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rank_share(micro_batches: int, rank: int, world_size: int) -> list[int | None]:
    """Micro-batch indices rank ``rank`` runs: round-robin, padded with None (a zero-weight pass
    over micro-batch 0) so that every rank runs ``ceil(micro_batches / world_size)`` passes."""
    mine: list[int | None] = list(range(rank, micro_batches, world_size))
    passes = -(-micro_batches // world_size)
    return mine + [None] * (passes - len(mine))


def uneven_shards(numels: Sequence[tuple[str, int]], world_size: int) -> list[tuple[str, int]]:
    """The parameters (name, element count) that ZeRO-3 cannot split into ``world_size`` equal shards."""
    return [(name, numel) for name, numel in numels if numel % world_size]


def ensure_distributed() -> None:
    """Initialise torch.distributed for DeepSpeed; a single local rank when no launcher set one up."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if not torch.distributed.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if get_accelerator().device_name() == "cpu":
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce kernel on first use
        # (minutes on a 2-core machine); a single rank never calls it and several CPU ranks use
        # gloo's all-reduce instead. Mark it unavailable: DeepSpeed keeps this probe result in one
        # module-level dict meant to be edited.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(
        dist_backend=get_accelerator().communication_backend_name(), auto_mpi_discovery=False, verbose=False
    )
