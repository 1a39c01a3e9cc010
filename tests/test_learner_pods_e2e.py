"""Two learner pods end to end: ``learner.replicas: 2`` under ``flowlane run``.

The run's learner is two components, learner-0 and learner-1, each a torchrun node of one rank
(``--nnodes 2 --node-rank i``, static rendezvous at learner-0's port on loopback, gloo on CPU).
Only learner-0 serves gRPC; the rollout worker talks to it, and learner-1 follows rank 0's calls.
The run trains 2 steps with ZeRO stage 2, writing a checkpoint after each, so both ranks' optimizer
shards and RNG states must be in it. (Resuming two pods from such a checkpoint is checked bit for
bit in ``test_distributed_learner.py``, without a whole run around it.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_flowrun_e2e import RunRecord, checkpoint_steps, finish, flowrun_yaml, start

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

STEPS = 2


def two_pod_flowrun(steps: int) -> dict:
    document = flowrun_yaml("pods", steps)
    document["spec"]["learner"] = {"replicas": 2, "ranks": 1}
    document["spec"]["engine"] = {"zeroStage": 2}
    return document


@pytest.fixture(scope="module")
def pods_run(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> RunRecord:
    base = tmp_path_factory.mktemp("pods")
    config = base / "flowrun.yaml"
    config.write_text(yaml.safe_dump(two_pod_flowrun(STEPS)))
    record = RunRecord(base / "run")
    finish(start(config, record.run_dir), record, 1500)
    return record


def test_a_run_with_two_learner_pods_completes(pods_run: RunRecord) -> None:
    assert pods_run.returncode == 0, pods_run.output[-3000:]
    assert f"steps {STEPS}/{STEPS}" in pods_run.output
    assert "4 components" in pods_run.output  # learner-0, learner-1, sandbox-0, rollout-0


def test_the_second_learner_pod_follows_rank_zero_to_the_end(pods_run: RunRecord) -> None:
    follower = pods_run.log("learner-1")
    # 2 steps and 2 checkpoints at least, plus the weight exports and the final model.
    calls = int(follower.split("rank 0 ended the run after ")[1].split()[0])
    assert calls >= 2 * STEPS


def test_the_checkpoint_holds_both_ranks_state(pods_run: RunRecord) -> None:
    assert checkpoint_steps(pods_run.run_dir) == [1, 2]
    step = pods_run.run_dir / "checkpoints" / "step-00000002"
    assert json.loads((step / "learner_state.json").read_text())["world_size"] == 2
    listed = {f["path"] for f in json.loads((step / "MANIFEST.json").read_text())["files"]}
    assert "deepspeed/rng_state_rank1.pt" in listed
    shards = sorted(Path(p).name for p in listed if p.endswith("optim_states.pt"))
    assert [name.split("zero_pp_rank_")[1].split("_")[0] for name in shards] == ["0", "1"], shards
