"""The FlowRun and FlowService spec models and their loaders: defaults, aliases, errors with paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flowlane.api.common import InvalidResourceError, set_condition
from flowlane.api.enums import AdvantageMode, Aggregation, KLEstimator
from flowlane.api.errors import ConfigError
from flowlane.api.flowrun import FlowRun, Phase, load_flowrun
from flowlane.api.flowservice import CheckpointChoice, load_flowservice

REPO = Path(__file__).resolve().parent.parent
HEADER = "apiVersion: flowlane.dev/v1alpha1\nkind: FlowRun\nmetadata: {name: demo}\n"


def problems(text: str) -> list[str]:
    with pytest.raises(InvalidResourceError) as info:
        load_flowrun(text)
    return info.value.problems


def test_minimal_flowrun_gets_the_default_two_core_run() -> None:
    run = load_flowrun(HEADER)
    spec = run.spec
    assert spec.model.planner == "smollm2-135m-instruct"
    assert [t.name for t in spec.tools] == ["python", "generator"]
    assert spec.tasks.dataset == "arithmetic"
    assert (spec.algorithm.group_size, spec.algorithm.batch_questions) == (4, 4)
    assert spec.algorithm.kl_estimator is KLEstimator.K3
    assert spec.algorithm.advantage_mode is AdvantageMode.TRAJECTORY
    assert spec.algorithm.loss_aggregation is Aggregation.PAPER
    assert (spec.algorithm.clip_low, spec.algorithm.clip_high) == (0.2, 0.3)
    assert (spec.rollout.replicas, spec.sandbox.replicas, spec.learner.replicas) == (1, 1, 1)
    assert (spec.rollout.resources.cpu, spec.rollout.resources.memory, spec.rollout.resources.gpu) == ("1", "6Gi", 0)
    assert (spec.sandbox.resources.cpu, spec.sandbox.resources.memory) == ("500m", "1Gi")
    assert (spec.schedule.steps, spec.schedule.checkpoint_interval) == (40, 10)
    assert (spec.backoff_limit, spec.max_staleness, spec.suspend) == (3, 0, False)


def test_fields_accept_camel_case_and_python_names() -> None:
    camel = load_flowrun(HEADER + "spec: {algorithm: {groupSize: 8, klBeta: 0.01}}")
    snake = load_flowrun(HEADER + "spec: {algorithm: {group_size: 8, kl_beta: 0.01}}")
    assert camel.spec.algorithm == snake.spec.algorithm
    assert camel.spec.algorithm.group_size == 8


def test_quantities_given_as_numbers_are_kept_as_kubernetes_text() -> None:
    run = load_flowrun(HEADER + "spec: {rollout: {resources: {cpu: 2, memory: 8Gi}}, "
                                "sandbox: {resources: {cpu: 0.5}}}")
    assert run.spec.rollout.resources.cpu == "2"
    assert run.spec.sandbox.resources.cpu == "0.5"


def test_every_invalid_field_is_reported_with_its_path() -> None:
    found = problems(HEADER + """spec:
  rollout: {replicas: 0, resources: {cpu: lots}}
  algorithm: {klEstimator: k2, clipLow: 1.5}
  storage: {checkpointUri: "http://x"}
""")
    assert found == [
        "spec.algorithm.klEstimator: must be one of 'k1' or 'k3', got 'k2'",
        "spec.algorithm.clipLow: must be < 1.0, got 1.5",
        "spec.rollout.replicas: must be >= 1, got 0",
        "spec.rollout.resources.cpu: must be a Kubernetes quantity such as 500m, 2 or 8Gi, got 'lots'",
        "spec.storage.checkpointUri: must be a file:// or s3:// URI (file:///abs/path, s3://bucket/prefix), "
        "got 'http://x'",
    ]


def test_unknown_field_is_rejected_with_its_path_and_a_suggestion() -> None:
    assert problems(HEADER + "spec: {algorithm: {groupSiz: 8}}") == [
        "spec.algorithm.groupSiz: unknown field; did you mean 'groupSize'?"
    ]


def test_unknown_top_level_spec_field_lists_the_known_ones_when_nothing_is_close() -> None:
    (problem,) = problems(HEADER + "spec: {zzz: 1}")
    assert problem.startswith("spec.zzz: unknown field; known fields: model, tools, tasks, algorithm")


def test_loader_error_is_one_config_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(HEADER + "spec: {rollout: {replicas: 0}, sandbox: {replicas: 0}}")
    with pytest.raises(ConfigError) as info:
        load_flowrun(path)
    assert str(info.value) == (f"{path}: invalid FlowRun (2 errors): spec.rollout.replicas: must be >= 1, got 0; "
                               "spec.sandbox.replicas: must be >= 1, got 0")


def test_checkpoint_interval_longer_than_the_run_is_a_cross_field_error() -> None:
    assert problems(HEADER + "spec: {schedule: {steps: 5, checkpointInterval: 10}}") == [
        "spec.schedule.checkpointInterval: must be <= steps (5), got 10: no checkpoint would be written "
        "before the end"
    ]


def test_ppo_epochs_and_mini_batches_reach_the_learner_and_must_be_at_least_one() -> None:
    from flowlane.trainer.learner_service import learner_config

    spec = load_flowrun(HEADER).spec
    assert (spec.algorithm.ppo_epochs, spec.algorithm.mini_batches) == (1, 1)
    config = learner_config(load_flowrun(HEADER + "spec: {algorithm: {ppoEpochs: 2, miniBatches: 3}}").spec)
    assert (config.ppo_epochs, config.mini_batches_per_step) == (2, 3)
    assert problems(HEADER + "spec: {algorithm: {ppoEpochs: 0, miniBatches: 0}}") == [
        "spec.algorithm.ppoEpochs: must be >= 1, got 0",
        "spec.algorithm.miniBatches: must be >= 1, got 0",
    ]


@pytest.mark.parametrize("spelling", ["judge", "llm_judge", "LLM_Judge"])
def test_reward_judge_is_refused_at_validation_naming_the_missing_judge_model(spelling: str) -> None:
    (problem,) = problems(HEADER + f"spec: {{tasks: {{dataset: /data/qa.jsonl, reward: {spelling}}}}}")
    assert problem.startswith("spec.tasks.reward: judge (also spelled llm_judge) needs an LLM judge model")
    assert problem.endswith("use exact, numeric, choice or game24")


def test_validation_fraction_is_checked_with_its_path() -> None:
    assert load_flowrun(HEADER).spec.schedule.validation_fraction == 0.1
    assert problems(HEADER + "spec: {schedule: {validationFraction: 0.6}}") == [
        "spec.schedule.validationFraction: must be <= 0.5, got 0.6"]
    assert problems(HEADER + "spec: {schedule: {validationFraction: -0.1}}") == [
        "spec.schedule.validationFraction: must be >= 0.0, got -0.1"]
    assert problems(HEADER + "spec: {schedule: {validationFraction: 0}}") == [
        "spec.schedule.validationFraction: 0 carves no validation split, but evalInterval (10) scores it during "
        "training; set evalInterval: 0 or validationFraction > 0 (e.g. 0.1)"]
    load_flowrun(HEADER + "spec: {schedule: {validationFraction: 0, evalInterval: 0}}")


@pytest.mark.parametrize(("tasks", "schedule", "what"), [
    ("{split: train}", "{evalSplit: train}", "'train' is also tasks.split"),
    ("{split: all}", "{}", "'test' overlaps tasks.split 'all' ('all' holds every row)"),
    ("{split: train}", "{evalSplit: all, evalTasks: arithmetic}",
     "'all' overlaps tasks.split 'train' ('all' holds every row)"),
])
def test_an_evaluation_split_that_overlaps_the_training_split_is_refused(tasks: str, schedule: str, what: str) -> None:
    (problem,) = problems(HEADER + f"spec: {{tasks: {tasks}, schedule: {schedule}}}")
    assert problem.startswith(f"spec.schedule.evalSplit: {what} of dataset 'arithmetic': test accuracy would be "
                              "measured on training questions")


def test_duplicate_tool_names_point_at_the_second_one() -> None:
    assert problems(HEADER + "spec: {tools: [{name: python}, {name: search}, {name: python}]}") == [
        "spec.tools[2].name: duplicate tool 'python'; list each tool once"
    ]


def test_s3_settings_without_an_s3_uri_are_rejected() -> None:
    assert problems(HEADER + "spec: {storage: {credentialsSecret: {name: s3}}}") == [
        "spec.storage.credentialsSecret: only used with an s3:// checkpointUri; set storage.checkpointUri "
        "to s3://bucket/prefix"
    ]


def test_name_too_long_for_its_children_is_rejected_on_metadata_name() -> None:
    name = "r" * 55
    (problem,) = problems(f"apiVersion: flowlane.dev/v1alpha1\nkind: FlowRun\nmetadata: {{name: {name}}}\n")
    assert problem.startswith(f"metadata.name: '{name}' is too long: children such as '{name}-sandbox-policy'")
    assert problem.endswith("use at most 48")


def test_wrong_kind_is_rejected() -> None:
    assert problems("apiVersion: flowlane.dev/v1alpha1\nkind: FlowService\nmetadata: {name: x}\n") == [
        "kind: must be one of 'FlowRun', got 'FlowService'"
    ]


def test_yaml_syntax_error_names_line_and_column() -> None:
    expected = r"<text>: line 3, column 2: not valid YAML \(expected .,. or .\]., but got .:.\)"
    with pytest.raises(ConfigError, match=expected):
        load_flowrun("a: 1\nb: [1, 2\nc: 3\n")


def test_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_flowrun(tmp_path / "nope.yaml")


def test_run_config_round_trips_through_the_loader() -> None:
    run = load_flowrun(REPO / "examples" / "flowrun-cluster.yaml")
    again = load_flowrun(yaml.safe_dump(run.run_config()))
    assert again.spec == run.spec
    assert again.metadata.name == run.metadata.name


def test_status_parses_phase_and_conditions() -> None:
    run = FlowRun.model_validate({
        "metadata": {"name": "x"},
        "status": {"phase": "Running", "restartCount": 2, "conditions": [
            {"type": "Ready", "status": "True", "reason": "AllPodsRunning",
             "lastTransitionTime": "2025-01-01T00:00:00Z"},
        ]},
    })
    assert run.status is not None
    assert run.status.phase is Phase.RUNNING
    assert run.status.restart_count == 2


def test_condition_transition_time_moves_only_when_status_flips() -> None:
    from datetime import UTC, datetime

    t0, t1 = datetime(2025, 1, 1, tzinfo=UTC), datetime(2025, 1, 2, tzinfo=UTC)
    conds = set_condition([], "Ready", False, "Starting", "", t0, 1)
    same = set_condition(conds, "Ready", False, "StillStarting", "x", t1, 2)
    flipped = set_condition(same, "Ready", True, "Running", "", t1, 2)
    assert same[0].last_transition_time == t0 and same[0].reason == "StillStarting"
    assert flipped[0].last_transition_time == t1


@pytest.mark.parametrize("name", ["flowrun.yaml", "flowrun-cluster.yaml", "flowrun-multihop.yaml"])
def test_example_flowruns_load(name: str) -> None:
    assert load_flowrun(REPO / "examples" / name).metadata.name


def test_default_example_differs_from_the_model_defaults_only_where_it_says_so() -> None:
    example = load_flowrun(REPO / "examples" / "flowrun.yaml")
    text = (REPO / "examples" / "flowrun.yaml").read_text()
    shortened = {  # the fields the file marks "(default: ...)": a run that fits a 2-core machine
        ("model", "fixed"): "smollm2-135m-instruct",
        ("algorithm", "batch_questions"): 8,
        ("algorithm", "lr"): 2e-5,
        ("schedule", "steps"): 12,
        ("schedule", "checkpoint_interval"): 4,
        ("schedule", "eval_interval"): 0,
    }
    assert text.count("# (default: ") == len(shortened)
    defaults = load_flowrun(HEADER).spec
    for (section, name), value in shortened.items():
        assert getattr(getattr(example.spec, section), name) == value
        setattr(getattr(defaults, section), name, value)
    assert example.spec == defaults


def test_example_flowservice_loads_with_a_flowrun_source() -> None:
    fsvc = load_flowservice(REPO / "examples" / "flowservice.yaml")
    assert fsvc.spec.model.flow_run is not None
    assert fsvc.spec.model.flow_run.checkpoint is CheckpointChoice.LATEST
    assert fsvc.spec.port == 8000


def test_flowservice_needs_exactly_one_model_source() -> None:
    base = "apiVersion: flowlane.dev/v1alpha1\nkind: FlowService\nmetadata: {name: s}\n"
    with pytest.raises(InvalidResourceError) as info:
        load_flowservice(base + "spec: {model: {uri: x, flowRun: {name: r}}}")
    assert info.value.problems == ["spec.model.flowRun: set exactly one of model.flowRun or model.uri"]
    with pytest.raises(InvalidResourceError) as info:
        load_flowservice(base + "spec: {model: {}}")
    assert info.value.problems == ["spec.model.flowRun: set exactly one of model.flowRun or model.uri"]


# -- scale-out settings: each refused with its field path and the reason ---------------------------


def test_learner_ranks_default_to_one_per_gpu_and_one_on_cpu() -> None:
    assert load_flowrun(HEADER).spec.learner.world_size == 1
    gpu = load_flowrun(HEADER + "spec: {learner: {resources: {gpu: 4}}}").spec.learner
    assert (gpu.ranks_per_replica, gpu.world_size) == (4, 4)
    cpu = load_flowrun(HEADER + "spec: {learner: {ranks: 2}}").spec.learner
    assert (cpu.ranks_per_replica, cpu.world_size) == (2, 2)


def test_several_learner_pods_multiply_the_world_size() -> None:
    # ZeRO-3's evenness depends on the model's layer shapes, so 3 pods pass here (checked at learner start).
    learner = load_flowrun(HEADER + "spec: {learner: {replicas: 3, ranks: 2}, engine: {zeroStage: 3}}").spec.learner
    assert (learner.replicas, learner.ranks_per_replica, learner.world_size) == (3, 2, 6)
    gpu = load_flowrun(HEADER + "spec: {learner: {replicas: 2, resources: {gpu: 8}}}").spec.learner
    assert gpu.world_size == 16


def test_more_learner_pods_than_the_limit_are_refused() -> None:
    assert problems(HEADER + "spec: {learner: {replicas: 65}}") == [
        "spec.learner.replicas: must be <= 64, got 65"
    ]


def test_learner_ranks_other_than_the_gpu_count_are_refused() -> None:
    assert problems(HEADER + "spec: {learner: {ranks: 2, resources: {gpu: 4}}}") == [
        "spec.learner.ranks: must equal resources.gpu (4): one rank per GPU, got 2"
    ]


def test_tensor_parallel_size_above_the_rollout_pods_gpus_is_refused() -> None:
    assert problems(HEADER + "spec: {engine: {tensorParallelSize: 4}, rollout: {resources: {gpu: 2}}}") == [
        "spec.engine.tensorParallelSize: 4 is more than the rollout pod's GPUs (rollout.resources.gpu: 2); one "
        "engine shards over the GPUs of its pod, so set rollout.resources.gpu: 4 or lower tensorParallelSize "
        "(more engines: rollout.replicas)"
    ]
    assert load_flowrun(HEADER + "spec: {engine: {tensorParallelSize: 2}, rollout: {resources: {gpu: 2}}}")


def test_nccl_weight_sync_without_gpus_is_refused_naming_the_empty_pods() -> None:
    assert problems(HEADER + "spec: {engine: {weightSync: nccl}}") == [
        "spec.engine.weightSync: nccl needs GPUs in the learner and rollout pods (learner.resources.gpu: 0, "
        "rollout.resources.gpu: 0); use store (workers fetch each version from the checkpoint store) or grpc"
    ]
    assert problems(HEADER + "spec: {engine: {weightSync: nccl}, learner: {resources: {gpu: 1}}, "
                             "rollout: {resources: {gpu: 1}}}") == [
        "spec.engine.weightSync: nccl has no GPU path in this version; use store (workers fetch each version "
        "from the checkpoint store) or grpc"
    ]
