"""Several learner ranks (gloo on CPU, torchrun) give the update of one rank.

The same two batches of trajectories go through a tiny random 2-layer Llama (hidden 64, float32)
on 1 rank and on 2 ranks (tests/learner_ranks.py under torchrun), with ZeRO stage 2 and stage 3.

Tolerance. The two runs compute the same micro-batches (same plan, same inputs); only the order
in which their float32 gradients are summed differs (rank-local sums, then gloo's all-reduce,
versus one running sum), a relative error of a few float32 ulps (~1e-7) in each gradient. Adam
divides each coordinate's first moment by the root of its second, so a relative gradient error
stays relative in the update, except in coordinates whose gradient is itself near rounding level.
An update coordinate is at most about lr (1e-3) per step. We allow 1e-5 absolute per weight (1%
of one step's largest possible move; measured: 6e-7 at stage 2, 1.5e-6 at stage 3) and 1e-4 for
the norm of the difference relative to the norm of the whole two-step update (measured: 2e-6,
4e-6). A run resumed from the 2-rank checkpoint after step 1 makes the same operations as the
uninterrupted run, so its weights are bit for bit the same.

Two learner pods are two torchrun nodes of one rank each (static rendezvous on loopback). The
second runs in its own mount namespace with a private tmpfs over rank 0's scratch directory, so,
as on Kubernetes, it does not see the directory rank 0 checkpoints into: it must upload its shards
to the (shared, file://) checkpoint store itself and fetch them back to resume.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from learner_helpers import make_tiny_model_dir, synthetic_trajectories
from safetensors.torch import load_file

from flowlane.api.errors import ConfigError
from flowlane.trainer.distributed import rank_share, uneven_shards

SCRIPT = Path(__file__).with_name("learner_ranks.py")
STAGES = (2, 3)
MAX_ABS = 1e-5
MAX_REL_L2 = 1e-4


def _launch(ranks: int, out: Path, model: Path, batches: Path, *extra: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               str(SCRIPT), str(model), str(batches), str(out), "--stages", *map(str, STAGES), *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ranks")
    model = make_tiny_model_dir(root / "model", hidden_size=64)
    rewards = [[1.0, 0.0, 0.0, 1.0]] * 4
    batches = [synthetic_trajectories(seed=s, questions=4, group_size=4, rewards=rewards) for s in (1, 2)]
    torch.save(batches, root / "batches.pt")
    _launch(1, root / "one", model, root / "batches.pt")
    _launch(2, root / "two", model, root / "batches.pt", "--save-after", "1")
    _launch(2, root / "resumed", model, root / "batches.pt", "--resume", str(root / "two" / "ckpt"))
    return {"model": model, "one": root / "one", "two": root / "two", "resumed": root / "resumed"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _launch_two_pods(out: Path, model: Path, batches: Path, store: Path, *extra: str) -> None:
    """Node 0 as a plain process, node 1 with a private tmpfs over ``out/scratch``."""
    scratch = out / "scratch"
    scratch.mkdir(parents=True)
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
            "--master-addr=127.0.0.1", f"--master-port={_free_port()}", "--max-restarts=0"]
    script = [str(SCRIPT), str(model), str(batches), str(out), "--stages", *map(str, STAGES),
              "--store", store.as_uri(), "--scratch", str(scratch), *extra]
    private = ["unshare", "--map-root-user", "--mount", "sh", "-c", 'mount -t tmpfs tmpfs "$0" && exec "$@"',
               str(scratch)]
    nodes = [subprocess.Popen([*node, "--node-rank=0", *script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True),
             subprocess.Popen([*private, *node, "--node-rank=1", *script], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)]
    outputs = [proc.communicate(timeout=600)[0] for proc in nodes]
    assert [proc.returncode for proc in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]


def _private_mounts_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--map-root-user", "--mount", "sh", "-c", "mount -t tmpfs tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.fixture(scope="module")
def pod_runs(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if not _private_mounts_work():
        pytest.skip("needs unshare with user and mount namespaces (a pod's private filesystem)")
    root = tmp_path_factory.mktemp("pods")
    batches = runs["model"].parent / "batches.pt"
    _launch_two_pods(root / "two", runs["model"], batches, root / "store", "--save-after", "1")
    _launch_two_pods(root / "resumed", runs["model"], batches, root / "store", "--resume-from-store")
    return {"store": root / "store", "two": root / "two", "resumed": root / "resumed"}


def _weights(run: Path, stage: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / f"stage{stage}.safetensors"))


def _metrics(run: Path, stage: int) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = json.loads((run / f"stage{stage}.json").read_text())
    return result


@pytest.mark.slow  # torchrun worlds of real processes (the `runs` and `pod_runs` fixtures)
@pytest.mark.parametrize("stage", STAGES)
def test_two_ranks_give_the_weights_of_one_rank(runs: dict[str, Path], stage: int) -> None:
    initial = load_file(str(runs["model"] / "model.safetensors"))
    one, two = _weights(runs["one"], stage), _weights(runs["two"], stage)
    assert sorted(one) == sorted(two)
    update = math.sqrt(sum(float(((one[k] - initial[k]) ** 2).sum()) for k in one if k in initial))
    difference = math.sqrt(sum(float(((one[k] - two[k]) ** 2).sum()) for k in one))
    assert update > 1e-2  # the two steps moved the weights
    assert max(float((one[k] - two[k]).abs().max()) for k in one) <= MAX_ABS
    assert difference / update <= MAX_REL_L2


@pytest.mark.slow  # torchrun worlds of real processes (the `runs` and `pod_runs` fixtures)
@pytest.mark.parametrize("stage", STAGES)
def test_two_ranks_split_the_micro_batches_and_report_the_totals_of_one(runs: dict[str, Path], stage: int) -> None:
    one, two = _metrics(runs["one"], stage), _metrics(runs["two"], stage)
    for a, b in zip(one, two, strict=True):
        # Counts summed over the ranks: each rank ran only its share (duplicated work would double them).
        assert (b["micro_batches"], b["tokens"], b["turns"]) == (a["micro_batches"], a["tokens"], a["turns"])
        assert a["micro_batches"] >= 10
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-7)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)


@pytest.mark.slow  # torchrun worlds of real processes (the `runs` and `pod_runs` fixtures)
@pytest.mark.parametrize("stage", STAGES)
def test_a_two_rank_checkpoint_resumes_to_the_same_weights(runs: dict[str, Path], stage: int) -> None:
    ckpt = runs["two"] / "ckpt" / f"stage{stage}"
    assert json.loads((ckpt / "learner_state.json").read_text())["world_size"] == 2
    assert (ckpt / "deepspeed" / "rng_state_rank1.pt").is_file()
    resumed, uninterrupted = _weights(runs["resumed"], stage), _weights(runs["two"], stage)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


@pytest.mark.slow  # torchrun worlds of real processes (the `runs` and `pod_runs` fixtures)
@pytest.mark.parametrize("stage", STAGES)
def test_two_learner_pods_train_like_two_ranks_in_one_pod(runs: dict[str, Path], pod_runs: dict[str, Path],
                                                          stage: int) -> None:
    pods, one_pod = _weights(pod_runs["two"], stage), _weights(runs["two"], stage)
    assert sorted(pods) == sorted(one_pod)
    assert max(float((pods[k] - one_pod[k]).abs().max()) for k in pods) <= MAX_ABS


@pytest.mark.slow  # torchrun worlds of real processes (the `runs` and `pod_runs` fixtures)
@pytest.mark.parametrize("stage", STAGES)
def test_a_pod_without_rank_zeros_filesystem_uploads_its_shards_into_the_checkpoint(
    pod_runs: dict[str, Path], stage: int
) -> None:
    step = pod_runs["store"] / f"stage{stage}" / "step-00000001"
    listed = {f["path"] for f in json.loads((step / "MANIFEST.json").read_text())["files"]}
    assert {"deepspeed/rng_state_rank1.pt", "rng_state.pt", "learner_state.json"} <= listed
    shards = sorted(Path(p).name for p in listed if "zero_pp_rank_" in p and p.endswith("optim_states.pt"))
    assert [name.split("zero_pp_rank_")[1].split("_")[0] for name in shards] == ["0", "1"]
    assert json.loads((step / "learner_state.json").read_text())["world_size"] == 2
    assert not list((pod_runs["store"] / f"stage{stage}").glob(".step-*"))  # parts moved in, nothing left over


@pytest.mark.slow  # torchrun worlds of real processes (the `runs` and `pod_runs` fixtures)
@pytest.mark.parametrize("stage", STAGES)
def test_two_learner_pods_resume_from_the_store_to_the_same_weights(pod_runs: dict[str, Path], stage: int) -> None:
    resumed, uninterrupted = _weights(pod_runs["resumed"], stage), _weights(pod_runs["two"], stage)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def test_a_pod_fetches_the_shared_state_and_only_its_own_ranks_shards() -> None:
    from flowlane.trainer.distributed import needed_to_load

    pod = range(2, 4)
    assert needed_to_load("learner_state.json", pod)
    assert needed_to_load("deepspeed/state/mp_rank_00_model_states.pt", pod)
    assert needed_to_load("deepspeed/state/zero_pp_rank_3_mp_rank_00_optim_states.pt", pod)
    assert not needed_to_load("deepspeed/state/zero_pp_rank_1_mp_rank_00_optim_states.pt", pod)
    assert needed_to_load("deepspeed/rng_state_rank2.pt", pod)
    assert not needed_to_load("deepspeed/rng_state_rank1.pt", pod)
    assert not needed_to_load("model.safetensors", pod)
    assert not needed_to_load("rng_state.pt", pod)


def test_micro_batches_go_round_robin_and_every_rank_runs_as_many_passes() -> None:
    assert rank_share(5, 0, 2) == [0, 2, 4]
    assert rank_share(5, 1, 2) == [1, 3, None]
    assert rank_share(1, 1, 2) == [None]
    assert rank_share(4, 0, 1) == [0, 1, 2, 3]


def test_parameters_that_do_not_split_into_equal_zero3_shards_are_named() -> None:
    numels = [("model.norm.weight", 64), ("model.embed_tokens.weight", 128 * 64)]
    assert uneven_shards(numels, 2) == []
    assert uneven_shards(numels, 3) == numels


def test_zero3_over_ranks_that_do_not_divide_the_layers_is_refused_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flowlane.trainer.distributed import ensure_distributed
    from flowlane.trainer.learner import Learner
    from flowlane.trainer.learner_config import LearnerConfig

    model = make_tiny_model_dir(tmp_path / "model", hidden_size=64)
    ensure_distributed()  # one real rank; the learner is then told there are three
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *args, **kwargs: 3)  # as under 3 ranks
    with pytest.raises(ConfigError) as info:
        Learner(LearnerConfig(model_path=str(model), zero_stage=3, dtype="float32", kl_beta=0.0))
    assert str(info.value).startswith(
        "engine.zeroStage: 3 over 3 learner ranks (learner.ranks x learner.replicas): the model's layers do not "
        "shard evenly: model.embed_tokens.weight has 8192 elements, not a multiple of 3"
    )
