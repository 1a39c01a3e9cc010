"""The FlowRun resource: one Flow-GRPO training run of an AgentFlow planner.

A FlowRun is what a user writes (``kubectl apply -f flowrun.yaml`` or ``flowlane run
flowrun.yaml``) and what the learner reads back as its run config. Spec and status are separate
types, as in KubeRay's API: the spec is the user's intent (validated here, defaults declared here),
the status is what the operator observed and is written only by it.

Every default below together is the *default run*: a run that fits a 2-core machine without a GPU,
trains the bundled SmolLM2-135M-Instruct planner on the bundled task set and finishes in well
under half an hour. ``examples/flowrun-cluster.yaml`` shows the values to change for a GPU cluster.

The CRD schema (``crds/flowruns.flowlane.dev.yaml``) is generated from these classes by
``flowlane generate``; checks that a schema cannot express (one field constrained by another)
live in the ``model_validator`` methods and are reported by the loader and by the operator with
the same field paths. Each of them is also a CEL rule (``x-kubernetes-validations``) beside the
type it constrains, so the API server refuses a bad spec at ``kubectl apply`` with that field path
and it never reaches a pod; ``tests/test_cel.py`` runs every rule on every bad spec it is for.
"""

from __future__ import annotations

import enum
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from flowlane.api.common import (
    DNS_SUBDOMAIN_PATTERN,
    GROUP_VERSION,
    HTTP_URL_PATTERN,
    STORAGE_URI_PATTERN,
    TOOL_NAME_PATTERN,
    Condition,
    ObjectMeta,
    PodTemplate,
    Quantity,
    Resources,
    S3CredentialsSecret,
    SecretKeyRef,
    SpecModel,
    field_error,
    load_resource,
)
from flowlane.api.enums import (
    AdvantageMode,
    Aggregation,
    Dtype,
    EngineKind,
    KLEstimator,
    LocalEngineKind,
    RewardKind,
)

KIND: Final = "FlowRun"
PLURAL: Final = "flowruns"

DEFAULT_PLANNER = "smollm2-135m-instruct"
DEFAULT_TASKS = "arithmetic"
# The longest suffix flowlane appends to a FlowRun's name for a child object ("-sandbox-NN").
_CHILD_SUFFIXES = ("-learner", "-config", "-grpc-token", "-sandbox-policy")
KUBERNETES_NAME_MAX = 63



class Phase(enum.StrEnum):
    """Where a FlowRun is in its life. Succeeded and Failed are final."""

    PENDING = "Pending"  # accepted; children are being created or pods are starting
    RUNNING = "Running"  # every pod runs
    RESTARTING = "Restarting"  # a pod failed (or the spec changed); the whole group is recreated
    SUSPENDED = "Suspended"  # spec.suspend: pods stopped, checkpoints kept
    SUCCEEDED = "Succeeded"  # the learner finished all steps
    FAILED = "Failed"  # invalid spec, backoffLimit or activeDeadlineSeconds exceeded

    @property
    def finished(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.FAILED)


class ConditionType(enum.StrEnum):
    ACCEPTED = "Accepted"  # the spec is valid and can be placed on this backend
    ADMITTED = "Admitted"  # the API server took every pod (no quota or admission webhook refused one)
    READY = "Ready"  # every pod of the group runs
    RUNNING = "Running"  # every pod of the group runs (Ready's twin, named as training operators name it)
    ROLLOUT_DEGRADED = "RolloutDegraded"  # the learner runs but a rollout worker is missing or not up
    WEIGHTS_SYNCED = "WeightsSynced"  # every rollout worker samples with the learner's current policy version
    CHECKPOINTED = "Checkpointed"  # a complete checkpoint exists; its URI is the message
    RESTARTING = "Restarting"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class WeightSync(enum.StrEnum):
    GRPC = "grpc"  # the learner streams weights to rollout workers over gRPC in chunks
    STORE = "store"  # the learner writes each version to the checkpoint store once; workers fetch it there
    NCCL = "nccl"  # GPU-to-GPU broadcast; refused until a GPU path exists


# -- spec ----------------------------------------------------------------------------------------


class LoraSpec(SpecModel):
    """Train a low-rank adapter instead of all planner weights."""

    enabled: bool = Field(False, description="Train LoRA adapters; the base weights stay frozen.")
    rank: int = Field(16, ge=1, le=1024, description="Rank r of each adapter.")
    alpha: int = Field(32, ge=1, le=4096, description="Scaling alpha (the update is scaled by alpha/r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        min_length=1,
        description="Names of the linear layers that get adapters.",
    )


class ModelVolume(SpecModel):
    """Model weights on a PersistentVolumeClaim (ReadOnlyMany, or ReadWriteOnce on one node)."""

    claim_name: str = Field(..., min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN,
                            description="Name of the PersistentVolumeClaim in the run's namespace.")
    mount_path: str = Field("/models", pattern=r"^/", description="Where the claim is mounted in pods (absolute).")


class ModelSpec(SpecModel):
    """Which models the agent uses. Only the planner is trained."""

    planner: str = Field(
        DEFAULT_PLANNER,
        min_length=1,
        description="The trainable planner: a known model name (see `flowlane models list`), "
        "a local model directory, or an s3:// URI of a model directory.",
    )
    reference: str | None = Field(
        None,
        min_length=1,
        description="The frozen reference policy for the KL term; default: the planner's initial weights.",
    )
    fixed: str | None = Field(
        None,
        min_length=1,
        description="A frozen model for the executor, verifier and generator (a second engine per rollout "
        "worker, never updated), e.g. the planner's base model as in the paper; default: none, those modules "
        "share the planner's engine and so follow its updates (one engine per worker).",
    )
    dtype: Dtype = Field(Dtype.AUTO, description="Weight dtype for engines and the learner.")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="LoRA options for the planner.")
    volume: ModelVolume | None = Field(
        None, description="A PersistentVolumeClaim with model directories, mounted read-only in the learner "
        "and rollout pods; name a model inside it by path, e.g. planner: /models/Qwen2.5-7B-Instruct.",
    )


class ToolSpec(SpecModel):
    """One tool the agent may call."""

    name: str = Field(..., min_length=1, max_length=63, pattern=TOOL_NAME_PATTERN,
                      description="Tool name from the tool registry, e.g. python, search, generator.")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Tool-specific options (e.g. a search corpus path or top-k); see the tool's docs.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    credentials_secret: SecretKeyRef | None = Field(
        None,
        description="A Secret key with this tool's API key (networked tools); exposed to rollout "
        "workers as FLOWLANE_TOOL_<NAME>_KEY.",
    )


def default_tools() -> list[ToolSpec]:
    return [ToolSpec(name="python"), ToolSpec(name="generator")]


#: Why ``tasks.reward: judge`` is refused: nothing gives a FlowRun's workers a judge model.
JUDGE_REFUSED: Final = ("needs an LLM judge model, and a FlowRun has no field to name one and its rollout workers "
                        "run no judge engine; use exact, numeric, choice or game24")


class TasksSpec(SpecModel):
    """Where training questions come from and how answers are scored."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [{
        "rule": f"!has(self.reward) || self.reward != '{RewardKind.JUDGE.value}'",
        "message": f"reward judge {JUDGE_REFUSED}",
        "fieldPath": ".reward",
    }]})

    dataset: str = Field(
        DEFAULT_TASKS,
        min_length=1,
        description="A bundled task set name, a local .jsonl/.parquet file or directory, "
        "or an s3:// URI of one.",
    )
    split: str = Field("train", min_length=1, description="Split of the dataset used for training.")
    reward: RewardKind = Field(RewardKind.NUMERIC, description="How a final answer of user data is scored (reward "
                               "0 or 1): exact, numeric, choice or game24; judge is refused (no judge model is "
                               "wired); bundled sets score with their own.")
    limit: int | None = Field(None, ge=1, description="Use at most this many training questions.")

    @model_validator(mode="after")
    def _offline_reward(self) -> TasksSpec:
        if self.reward is RewardKind.JUDGE:
            raise field_error("reward", f"judge (also spelled llm_judge) {JUDGE_REFUSED}")
        return self


class AlgorithmSpec(SpecModel):
    """Flow-GRPO hyper-parameters (see AGENTFLOW.md for the objective)."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [{
        # 3: maxTurns' default (below), as the CEL sees an object without it
        "rule": "!has(self.minTurns) || self.minTurns <= (has(self.maxTurns) ? self.maxTurns : 3)",
        "message": "minTurns must be <= maxTurns",
        "fieldPath": ".minTurns",
    }]})

    group_size: int = Field(4, ge=2, le=256, description="G: trajectories sampled per question.")
    batch_questions: int = Field(4, ge=1, le=4096, description="Questions per training step.")
    lr: float = Field(1e-5, gt=0.0, le=1.0, description="Learning rate of the planner optimizer.")
    kl_beta: float = Field(0.001, ge=0.0, le=10.0, description="beta: weight of the KL(pi || pi_ref) loss term.")
    kl_estimator: KLEstimator = Field(KLEstimator.K3, description="Per-token KL estimator: k1 or k3.")
    clip_low: float = Field(0.2, gt=0.0, lt=1.0, description="epsilon_low: ratios below 1 - clipLow are clipped.")
    clip_high: float = Field(0.3, gt=0.0, le=10.0, description="epsilon_high: ratios above 1 + clipHigh are clipped.")
    advantage_mode: AdvantageMode = Field(
        AdvantageMode.TRAJECTORY, description="trajectory (the paper) or turn (the reference code)."
    )
    loss_aggregation: Aggregation = Field(
        Aggregation.PAPER, description="paper (per-token, per-turn, per-trajectory means) or tokenMean."
    )
    temperature: float = Field(0.7, ge=0.0, le=2.0, description="Planner sampling temperature during rollout.")
    max_turns: int = Field(3, ge=1, le=64, description="Planner turn budget per trajectory in training.")
    min_turns: int = Field(
        1, ge=1, le=64,
        description="Planner turns before the frozen verifier is first asked to stop, in training and evaluation "
        "(1: after every turn). A small verifier that stops at the first tool result ends every multi-hop "
        "question one hop short.",
    )
    max_planner_tokens: int = Field(256, ge=16, le=32768, description="Token budget of one planner output.")
    skip_uniform_groups: bool = Field(
        True, description="Skip questions whose G rewards are all equal (zero advantage, no signal)."
    )
    ppo_epochs: int = Field(
        1, ge=1, le=64,
        description="Passes over a step's trajectories; >1 reuses them against the policy before the step "
        "(log-probs taken once up front), so clipLow/clipHigh bound how far the step moves.",
    )
    mini_batches: int = Field(
        1, ge=1, le=4096,
        description="Optimizer updates per pass: a step's question groups split evenly into this many; >1 "
        "clips later updates against the policy before the step.",
    )
    tis_cap: float = Field(
        2.0, ge=1.0, le=100.0,
        description="Truncated importance sampling cap for stale samples (maxStaleness > 0).",
    )
    seed: int = Field(0, ge=0, description="Seed for task order and sampling.")

    @model_validator(mode="after")
    def _turn_floor_within_budget(self) -> AlgorithmSpec:
        if self.min_turns > self.max_turns:
            raise field_error("minTurns", f"must be <= maxTurns ({self.max_turns}), got {self.min_turns}: the "
                              "turn budget ends the trajectory first")
        return self


class EngineSpec(SpecModel):
    """Inference engine of rollout workers and training engine settings of the learner."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [{
        "rule": "!has(self.weightSync) || self.weightSync != 'nccl'",
        "message": "weightSync nccl has no GPU path in this version; use store or grpc",
        "fieldPath": ".weightSync",
    }]})

    kind: LocalEngineKind = Field(EngineKind.VLLM, description="Rollout inference engine: vllm or transformers.")
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage of the learner (0 disables).")
    max_model_len: int = Field(4096, ge=256, le=1048576, description="Context length of engine sequences.")
    gpu_memory_utilization: float = Field(
        0.85, gt=0.0, le=1.0, description="Fraction of GPU memory vLLM may use (GPU rollouts only); with "
        "model.fixed the planner's and the fixed engine share it, half each.",
    )
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="GPUs one vLLM engine is sharded over.")
    weight_sync: WeightSync = Field(
        WeightSync.GRPC, description="How new policy weights reach rollout workers: grpc (a stream per worker "
        "from the learner) or store (written once to the checkpoint store, fetched by each worker); nccl is "
        "refused for now.",
    )


class RolloutResources(Resources):
    """Compute for one rollout worker (its vLLM engine holds the planner and the fixed model)."""

    memory: Quantity = Field("6Gi", description="Memory request and limit per worker (Kubernetes quantity).")


class LearnerResources(Resources):
    """Compute for the learner (policy, reference model, optimizer state)."""

    memory: Quantity = Field("6Gi", description="Memory request and limit of the learner (Kubernetes quantity).")


class SandboxResources(Resources):
    """Compute for one sandbox server (the code it runs has its own, smaller limits)."""

    cpu: Quantity = Field("500m", description="CPU request and limit per sandbox (Kubernetes quantity).")
    memory: Quantity = Field("1Gi", description="Memory request and limit per sandbox (Kubernetes quantity).")


class RolloutSpec(SpecModel):
    """Rollout workers: run agent trajectories with the current planner and score them."""

    replicas: int = Field(1, ge=1, le=1024, description="Number of rollout workers.")
    resources: RolloutResources = Field(default_factory=RolloutResources, description="Per-worker compute.")


class LearnerSpec(SpecModel):
    """The learner: Flow-GRPO updates, checkpoints, metrics; the hub the workers talk to.

    It is ``replicas x ranks`` torch.distributed ranks under DeepSpeed (data parallel, ZeRO
    ``engine.zeroStage``): ``replicas`` pods (nodes), each running ``ranks`` processes. Rank 0, in
    the first pod, serves gRPC and hands each step's batch to the others. Whether ZeRO-3 can shard
    the model over that many ranks depends on its layer shapes, so it is checked at learner start.
    """

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": "!has(self.ranks) || !has(self.resources) || !has(self.resources.gpu) || self.resources.gpu == 0 "
                 "|| self.ranks == self.resources.gpu",
         "message": "ranks must equal resources.gpu: one rank per GPU", "fieldPath": ".ranks"},
    ]})

    replicas: int = Field(1, ge=1, le=64, description="Learner pods (torchrun nodes), each with ranks processes: "
                          "world size = replicas x ranks. The first serves gRPC; every pod writes its own shards "
                          "to the checkpoint store, so pods on several nodes need s3:// or a ReadWriteMany "
                          "volumeClaimName.")
    ranks: int | None = Field(
        None, ge=1, le=64, description="Ranks (processes) per learner pod; default: resources.gpu (one per GPU), "
        "or 1 without GPUs. On CPU, >1 runs gloo ranks (tests, small runs).",
    )
    resources: LearnerResources = Field(default_factory=LearnerResources, description="Learner compute.")

    @property
    def ranks_per_replica(self) -> int:
        return self.ranks or max(self.resources.gpu, 1)

    @property
    def world_size(self) -> int:
        return self.replicas * self.ranks_per_replica

    @model_validator(mode="after")
    def _placeable(self) -> LearnerSpec:
        if self.ranks is not None and self.resources.gpu and self.ranks != self.resources.gpu:
            raise field_error("ranks", f"must equal resources.gpu ({self.resources.gpu}): one rank per GPU, "
                              f"got {self.ranks}")
        return self


class SandboxLimits(SpecModel):
    """Limits for each piece of untrusted code a sandbox runs."""

    cpu_time_seconds: float = Field(10.0, gt=0.0, le=3600.0, description="CPU-time limit of one execution.")
    wall_time_seconds: float = Field(20.0, gt=0.0, le=3600.0, description="Wall-clock limit of one execution.")
    memory_mib: int = Field(512, ge=16, le=1048576, alias="memoryMiB",
                             description="Address-space limit of one execution, in MiB.")
    processes: int = Field(16, ge=1, le=4096, description="Maximum processes/threads one execution may create.")
    file_size_mib: int = Field(16, ge=0, le=1048576, alias="fileSizeMiB",
                                description="Largest file one execution may write, in MiB.")
    output_bytes: int = Field(8192, ge=256, le=16777216, description="stdout/stderr beyond this is truncated.")


class SandboxSpec(SpecModel):
    """Tool sandboxes: run the agent's code with limits, no network, non-root."""

    replicas: int = Field(1, ge=1, le=1024, description="Number of sandbox servers.")
    resources: SandboxResources = Field(default_factory=SandboxResources, description="Per-sandbox compute.")
    limits: SandboxLimits = Field(default_factory=SandboxLimits, description="Per-execution limits.")
    runtime_class_name: str | None = Field(
        None, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="RuntimeClass of the sandbox pods (e.g. gvisor, kata) where the cluster offers one.")
    allow_weak_isolation: bool = Field(
        False, description="Run code even where a mandatory sandbox layer (seccomp, Landlock, non-dumpable "
        "server, process tracking) is missing; the sandbox refuses to start otherwise.")


class StorageSpec(SpecModel):
    """Where checkpoints go."""

    checkpoint_uri: str | None = Field(
        None,
        pattern=STORAGE_URI_PATTERN,
        description="file:///path or s3://bucket/prefix; default: file://<run dir>/checkpoints locally. "
        "On Kubernetes use s3:// or set volumeClaimName for file://.",
    )
    s3_endpoint: str | None = Field(
        None, pattern=HTTP_URL_PATTERN, description="S3 endpoint URL (e.g. http://minio.minio:9000); default: AWS."
    )
    credentials_secret: S3CredentialsSecret | None = Field(
        None, description="Secret with the S3 access keys (exposed as AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)."
    )
    volume_claim_name: str | None = Field(
        None, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="A PersistentVolumeClaim mounted at the file:// checkpoint path (Kubernetes only).",
    )
    keep_last: int = Field(3, ge=1, le=1000, description="Checkpoints kept; older ones are deleted.")


class TrackingSpec(SpecModel):
    """Where metrics go."""

    mlflow_uri: str | None = Field(
        None, min_length=1,
        description="MLflow tracking URI (http://..., file:..., sqlite:...); default: a local store in the run dir.",
    )
    experiment: str = Field("flowlane", min_length=1, description="MLflow experiment name.")


class ScheduleSpec(SpecModel):
    """How long to train and when to checkpoint and evaluate."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [{
        "rule": "self.checkpointInterval <= self.steps",
        "message": "checkpointInterval must be <= steps, or no checkpoint is written before the end",
        "fieldPath": ".checkpointInterval",
    }, {
        "rule": "self.evalInterval == 0 || double(self.validationFraction) > 0.0",
        "message": "mid-run evaluation scores the validation split and validationFraction 0 carves none; set "
                   "evalInterval: 0 or validationFraction > 0",
        "fieldPath": ".validationFraction",
    }]})

    steps: int = Field(40, ge=1, le=10_000_000, description="Training steps (policy updates).")
    checkpoint_interval: int = Field(
        10, ge=1, description="Write a checkpoint every this many steps (and at the end)."
    )
    eval_interval: int = Field(
        10, ge=0, description="Score the validation split every this many steps (and at the end; the best "
        "checkpoint is chosen by it); 0: none. The test split (evalSplit) is scored once before and once "
        "after training.",
    )
    validation_fraction: float = Field(
        0.1, ge=0.0, le=0.5, description="Share of the training split held out as the validation split (chosen "
        "by a hash of algorithm.seed and each question's id, so stable across restarts); training uses the rest.",
    )
    eval_tasks: str | None = Field(
        None, min_length=1, description="Task set for evaluation; default: spec.tasks.dataset."
    )
    eval_split: str = Field("test", min_length=1, description="Held-out test split, scored before and after "
                            "training; never used to choose a checkpoint.")
    eval_limit: int | None = Field(None, ge=1, description="Score at most this many questions of the validation "
                                   "and of the test split.")
    eval_max_turns: int = Field(10, ge=1, le=64, description="Planner turn budget at evaluation (10 in the paper).")

    @model_validator(mode="after")
    def _checkpoint_within_run(self) -> ScheduleSpec:
        if self.checkpoint_interval > self.steps:
            raise field_error("checkpointInterval", f"must be <= steps ({self.steps}), got "
                              f"{self.checkpoint_interval}: no checkpoint would be written before the end")
        if self.eval_interval and not self.validation_fraction:
            raise field_error("validationFraction", f"0 carves no validation split, but evalInterval "
                              f"({self.eval_interval}) scores it during training; set evalInterval: 0 or "
                              "validationFraction > 0 (e.g. 0.1)")
        return self


def _cel_value(path: str, default: object) -> str:
    """CEL for ``self.<path>``, or the schema's default where a level is absent (``a.b`` -> has() chain)."""
    parts = path.split(".")
    guards = " && ".join(f"has(self.{'.'.join(parts[:i + 1])})" for i in range(len(parts)))
    literal = f"'{default}'" if isinstance(default, str) else str(default)
    return f"({guards} ? self.{path} : {literal})"


#: The split name that holds every row, the training split's among them.
ALL_SPLIT: Final = "all"
_EVAL_SPLIT = _cel_value("schedule.evalSplit", ScheduleSpec.model_fields["eval_split"].default)
_TRAIN_SPLIT = _cel_value("tasks.split", TasksSpec.model_fields["split"].default)
_TRAIN_DATASET = _cel_value("tasks.dataset", TasksSpec.model_fields["dataset"].default)
_TP_SIZE = _cel_value("engine.tensorParallelSize", EngineSpec.model_fields["tensor_parallel_size"].default)
_MIN_TURNS = _cel_value("algorithm.minTurns", AlgorithmSpec.model_fields["min_turns"].default)
_EVAL_MAX_TURNS = _cel_value("schedule.evalMaxTurns", ScheduleSpec.model_fields["eval_max_turns"].default)
_ROLLOUT_GPUS = _cel_value("rollout.resources.gpu", RolloutResources.model_fields["gpu"].default)


#: The cross-field rules of FlowRunSpec._cross_field as CEL, on the spec object.
_SPEC_RULES: list[Any] = [
    {"rule": f"({_EVAL_SPLIT} != {_TRAIN_SPLIT} && {_EVAL_SPLIT} != '{ALL_SPLIT}' && {_TRAIN_SPLIT} != '{ALL_SPLIT}') "
             f"|| (has(self.schedule) && has(self.schedule.evalTasks) && self.schedule.evalTasks != {_TRAIN_DATASET})",
     "message": "evalSplit overlaps the training split of the same dataset (the same split, or 'all' on either "
                "side): test accuracy would be measured on training questions; set schedule.evalSplit to a "
                "held-out split or schedule.evalTasks to another dataset",
     "fieldPath": ".schedule.evalSplit"},
    {"rule": f"{_MIN_TURNS} <= {_EVAL_MAX_TURNS}",
     "message": "evalMaxTurns is less than algorithm.minTurns: evaluation's turn budget would end first",
     "fieldPath": ".schedule.evalMaxTurns"},
    {"rule": f"{_TP_SIZE} <= 1 || {_ROLLOUT_GPUS} >= {_TP_SIZE}",
     "message": "tensorParallelSize is more than the rollout pod's GPUs (rollout.resources.gpu)",
     "fieldPath": ".engine.tensorParallelSize"},
    *({"rule": f"!has(self.storage) || !has(self.storage.{name}) || (has(self.storage.checkpointUri) && "
               f"self.storage.checkpointUri.startsWith('{prefix}'))",
       "message": message, "fieldPath": f".storage.{name}"}
      for name, prefix, message in [
          ("credentialsSecret", "s3://", "only used with an s3:// checkpointUri"),
          ("s3Endpoint", "s3://", "only used with an s3:// checkpointUri"),
          ("volumeClaimName", "file:///", "needs an absolute file:/// checkpointUri to mount the claim at")]),
]


class FlowRunSpec(SpecModel):
    """The desired training run."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": _SPEC_RULES})

    model: ModelSpec = Field(default_factory=ModelSpec, description="Planner, reference and fixed-module models.")
    tools: list[ToolSpec] = Field(
        default_factory=default_tools,
        max_length=64,
        description="Tools the agent may call, by name, with per-tool options.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    tasks: TasksSpec = Field(default_factory=TasksSpec, description="Training questions and reward.")
    algorithm: AlgorithmSpec = Field(default_factory=AlgorithmSpec, description="Flow-GRPO hyper-parameters.")
    engine: EngineSpec = Field(default_factory=EngineSpec, description="Inference and training engine settings.")
    rollout: RolloutSpec = Field(default_factory=RolloutSpec, description="Rollout workers.")
    learner: LearnerSpec = Field(default_factory=LearnerSpec, description="The learner.")
    sandbox: SandboxSpec = Field(default_factory=SandboxSpec, description="Tool sandboxes.")
    storage: StorageSpec = Field(default_factory=StorageSpec, description="Checkpoint store.")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec, description="Metrics tracking.")
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec, description="Steps, checkpoints, evaluation.")
    suspend: bool = Field(False, description="true stops all pods and keeps checkpoints; false resumes.")
    backoff_limit: int = Field(3, ge=0, le=1000, description="Whole-group restarts after pod failures before Failed.")
    active_deadline_seconds: int | None = Field(
        None, ge=1, description="Fail the run when it has been active this long (reset on resume from suspend)."
    )
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, description="Delete the FlowRun this long after it Succeeded or Failed."
    )
    max_staleness: int = Field(
        0, ge=0, le=64,
        description="Policy versions a sample may lag; >0 overlaps rollout with learning (corrected with TIS).",
    )
    grpc_auth: SecretKeyRef | None = Field(
        None,
        description="Secret key with the shared gRPC token; default: the operator creates <name>-grpc-token.",
    )
    pod_template: PodTemplate = Field(
        default_factory=PodTemplate, description="Labels, annotations, priority class, scheduler, service account "
        "and pull secrets of every pod of the run (learner, rollout, sandbox).",
    )

    @field_validator("tools")
    @classmethod
    def _unique_tools(cls, tools: list[ToolSpec]) -> list[ToolSpec]:
        seen: set[str] = set()
        for i, tool in enumerate(tools):
            if tool.name in seen:
                raise field_error(f"{i}.name", f"duplicate tool {tool.name!r}; list each tool once")
            seen.add(tool.name)
        return tools

    @model_validator(mode="after")
    def _cross_field(self) -> FlowRunSpec:
        storage = self.storage
        if storage.credentials_secret is not None and not (storage.checkpoint_uri or "").startswith("s3://"):
            raise field_error("storage.credentialsSecret",
                              "only used with an s3:// checkpointUri; set storage.checkpointUri to s3://bucket/prefix")
        if storage.s3_endpoint is not None and not (storage.checkpoint_uri or "").startswith("s3://"):
            raise field_error("storage.s3Endpoint",
                              "only used with an s3:// checkpointUri; set storage.checkpointUri to s3://bucket/prefix")
        if storage.volume_claim_name is not None and not (storage.checkpoint_uri or "").startswith("file:///"):
            raise field_error("storage.volumeClaimName",
                              "needs an absolute file:/// checkpointUri to mount the claim at")
        schedule, tasks = self.schedule, self.tasks
        overlap = schedule.eval_split == tasks.split or ALL_SPLIT in (schedule.eval_split, tasks.split)
        if overlap and schedule.eval_tasks in (None, tasks.dataset):
            what = ("is also tasks.split" if schedule.eval_split == tasks.split else
                    f"overlaps tasks.split {tasks.split!r} ('{ALL_SPLIT}' holds every row)")
            raise field_error("schedule.evalSplit",
                              f"{schedule.eval_split!r} {what} of dataset {tasks.dataset!r}: test accuracy would "
                              "be measured on training questions; set schedule.evalSplit to a held-out split "
                              "(e.g. test) or schedule.evalTasks to another dataset")
        if self.algorithm.min_turns > schedule.eval_max_turns:
            raise field_error("schedule.evalMaxTurns", f"{schedule.eval_max_turns} is less than algorithm.minTurns "
                              f"({self.algorithm.min_turns}): evaluation's turn budget would end first")
        tp, rollout_gpus = self.engine.tensor_parallel_size, self.rollout.resources.gpu
        if tp > 1 and rollout_gpus < tp:
            raise field_error("engine.tensorParallelSize",
                              f"{tp} is more than the rollout pod's GPUs (rollout.resources.gpu: {rollout_gpus}); "
                              f"one engine shards over the GPUs of its pod, so set rollout.resources.gpu: {tp} "
                              "or lower tensorParallelSize (more engines: rollout.replicas)")
        if self.engine.weight_sync is WeightSync.NCCL:
            gpus = {"learner.resources.gpu": self.learner.resources.gpu, "rollout.resources.gpu": rollout_gpus}
            missing = [f"{name}: 0" for name, count in gpus.items() if count == 0]
            reason = (f"needs GPUs in the learner and rollout pods ({', '.join(missing)})" if missing
                      else "has no GPU path in this version")
            raise field_error("engine.weightSync", f"nccl {reason}; use store (workers fetch each version "
                              "from the checkpoint store) or grpc")
        return self


# -- status --------------------------------------------------------------------------------------


class FlowRunStatus(SpecModel):
    """What the operator observed. Written only by the operator."""

    phase: Phase | None = Field(None, description="Pending, Running, Restarting, Suspended, Succeeded or Failed.")
    message: str | None = Field(None, description="One line on the current phase: what happens or what to fix.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Accepted, Admitted, Ready, Running, RolloutDegraded, WeightsSynced, Checkpointed, Restarting, "
        "Suspended, Succeeded, Failed; each with a reason and a message.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: int | None = Field(None, ge=0, description="metadata.generation the status reflects.")
    restart_count: int = Field(0, ge=0, description="Whole-group restarts after pod failures so far.")
    step: int | None = Field(None, ge=0, description="Training steps completed (from the learner).")
    total_steps: int | None = Field(None, ge=0, description="Steps the run will take.")
    policy_version: int | None = Field(None, ge=0, description="Newest policy version the learner published.")
    worker_policy_versions: dict[str, int] | None = Field(
        None, description="Rollout worker (rollout-0, ...) -> the policy version its latest trajectory was sampled "
        "with; a worker that has not submitted since it (re)started is absent.")
    staleness: int | None = Field(
        None, ge=0, description="policyVersion minus the oldest version in workerPolicyVersions.")
    last_weight_sync_seconds: float | None = Field(
        None, ge=0, description="Wall time of the newest version's weight sync: the learner publishing it plus the "
        "slowest worker's transfer of it so far.")
    reward: float | None = Field(None, description="Mean reward of the last step's trajectories.")
    held_out_accuracy: float | None = Field(
        None, description="Accuracy of the trained planner on the held-out test split (scored once, at the end).")
    baseline_accuracy: float | None = Field(None, description="Test-split accuracy of the untrained planner.")
    validation_accuracy: float | None = Field(None, description="Latest accuracy on the validation split.")
    best_validation_accuracy: float | None = Field(
        None, description="Best validation accuracy of a checkpointed step (bestCheckpoint's).")
    last_checkpoint: str | None = Field(None, description="URI of the newest complete checkpoint.")
    best_checkpoint: str | None = Field(
        None, description="Checkpoint with the best validation accuracy (the test split never selects)."
    )
    mlflow_run_id: str | None = Field(None, description="MLflow run id of this training run.")
    start_time: datetime | None = Field(None, description="When the run (last) became active.")
    completion_time: datetime | None = Field(None, description="When the run Succeeded or Failed.")


#: The longest name whose every child name fits (the replica limits keep "-rollout-N" and
#: "-sandbox-N" shorter than the longest fixed suffix).
MAX_NAME_LENGTH: Final = KUBERNETES_NAME_MAX - max(len(s) for s in (*_CHILD_SUFFIXES, "-rollout-1023", "-sandbox-1023"))
#: CEL rules on the whole object (the CRD schema's root, where metadata.name is visible).
RESOURCE_VALIDATIONS: Final = [{
    "rule": f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
    "message": f"metadata.name is too long: children such as <name>-sandbox-policy must fit 63 characters; use at "
               f"most {MAX_NAME_LENGTH}",
    "fieldPath": ".metadata.name",
}]


class FlowRun(SpecModel):
    """A FlowRun object: ``apiVersion``, ``kind``, ``metadata``, ``spec`` and ``status``."""

    api_version: Literal["flowlane.dev/v1alpha1"] = Field(
        GROUP_VERSION, alias="apiVersion", description="flowlane.dev/v1alpha1"
    )
    kind: Literal["FlowRun"] = Field(KIND, description="FlowRun")
    metadata: ObjectMeta = Field(..., description="Standard object metadata; metadata.name names the run.")
    spec: FlowRunSpec = Field(default_factory=FlowRunSpec, description="The desired training run.")
    status: FlowRunStatus | None = Field(None, description="Observed state, written by the operator.")

    @model_validator(mode="after")
    def _child_names_fit(self) -> FlowRun:
        longest = max(
            [*_CHILD_SUFFIXES, f"-rollout-{self.spec.rollout.replicas - 1}",
             f"-sandbox-{self.spec.sandbox.replicas - 1}"],
            key=len,
        )
        limit = KUBERNETES_NAME_MAX - len(longest)
        if len(self.metadata.name) > limit:
            raise field_error("metadata.name", f"{self.metadata.name!r} is too long: children such as "
                              f"'{self.metadata.name}{longest}' must fit 63 characters; use at most {limit}")
        return self

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace or "default"

    def run_config(self) -> dict[str, Any]:
        """The run config every component reads: this object without status, defaults filled in."""
        data = self.model_dump(mode="json", by_alias=True, exclude_none=True, exclude={"status"})
        # Only the identity: labels and annotations change under controllers and must not roll pods.
        data["metadata"] = {k: v for k, v in data["metadata"].items() if k in ("name", "namespace")}
        return data


def load_flowrun(source: str | Path) -> FlowRun:
    """Read a FlowRun from a YAML file path or YAML text.

    Raises ``ConfigError`` naming every invalid field by its path, e.g.
    ``spec.rollout.replicas: must be >= 1, got 0``.
    """
    return load_resource(FlowRun, source, KIND)


def tool_secret_env(tool_name: str) -> str:
    """Environment variable carrying a networked tool's API key in rollout workers."""
    return "FLOWLANE_TOOL_" + re.sub(r"[^A-Z0-9]", "_", tool_name.upper()) + "_KEY"
