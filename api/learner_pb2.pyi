from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskRequest(_message.Message):
    __slots__ = ("worker_id", "max_tasks")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_TASKS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    max_tasks: int
    def __init__(self, worker_id: _Optional[str] = ..., max_tasks: _Optional[int] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("question_id", "question", "answer", "source", "reward_kind", "unit_id", "seed", "eval")
    QUESTION_ID_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    REWARD_KIND_FIELD_NUMBER: _ClassVar[int]
    UNIT_ID_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    EVAL_FIELD_NUMBER: _ClassVar[int]
    question_id: str
    question: str
    answer: str
    source: str
    reward_kind: str
    unit_id: str
    seed: int
    eval: bool
    def __init__(self, question_id: _Optional[str] = ..., question: _Optional[str] = ..., answer: _Optional[str] = ..., source: _Optional[str] = ..., reward_kind: _Optional[str] = ..., unit_id: _Optional[str] = ..., seed: _Optional[int] = ..., eval: _Optional[bool] = ...) -> None: ...

class TaskBatch(_message.Message):
    __slots__ = ("tasks", "policy_version", "done", "group_size", "step")
    TASKS_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[Task]
    policy_version: int
    done: bool
    group_size: int
    step: int
    def __init__(self, tasks: _Optional[_Iterable[_Union[Task, _Mapping]]] = ..., policy_version: _Optional[int] = ..., done: _Optional[bool] = ..., group_size: _Optional[int] = ..., step: _Optional[int] = ...) -> None: ...

class PlannerTurnRecord(_message.Message):
    __slots__ = ("prompt_ids", "response_ids", "logprobs", "response_mask", "policy_version")
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_MASK_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    response_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    response_mask: _containers.RepeatedScalarFieldContainer[int]
    policy_version: int
    def __init__(self, prompt_ids: _Optional[_Iterable[int]] = ..., response_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ..., response_mask: _Optional[_Iterable[int]] = ..., policy_version: _Optional[int] = ...) -> None: ...

class TrajectoryRecord(_message.Message):
    __slots__ = ("trajectory_id", "question_id", "reward", "turns", "worker_id", "trajectory_json")
    TRAJECTORY_ID_FIELD_NUMBER: _ClassVar[int]
    QUESTION_ID_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TRAJECTORY_JSON_FIELD_NUMBER: _ClassVar[int]
    trajectory_id: str
    question_id: str
    reward: float
    turns: _containers.RepeatedCompositeFieldContainer[PlannerTurnRecord]
    worker_id: str
    trajectory_json: str
    def __init__(self, trajectory_id: _Optional[str] = ..., question_id: _Optional[str] = ..., reward: _Optional[float] = ..., turns: _Optional[_Iterable[_Union[PlannerTurnRecord, _Mapping]]] = ..., worker_id: _Optional[str] = ..., trajectory_json: _Optional[str] = ...) -> None: ...

class TrajectoryChunk(_message.Message):
    __slots__ = ("trajectories",)
    TRAJECTORIES_FIELD_NUMBER: _ClassVar[int]
    trajectories: _containers.RepeatedCompositeFieldContainer[TrajectoryRecord]
    def __init__(self, trajectories: _Optional[_Iterable[_Union[TrajectoryRecord, _Mapping]]] = ...) -> None: ...

class SubmitAck(_message.Message):
    __slots__ = ("accepted", "duplicates", "rejected", "policy_version", "reasons")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    duplicates: int
    rejected: int
    policy_version: int
    reasons: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, accepted: _Optional[int] = ..., duplicates: _Optional[int] = ..., rejected: _Optional[int] = ..., policy_version: _Optional[int] = ..., reasons: _Optional[_Iterable[str]] = ...) -> None: ...

class WeightsRequest(_message.Message):
    __slots__ = ("min_version", "chunk_bytes")
    MIN_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    min_version: int
    chunk_bytes: int
    def __init__(self, min_version: _Optional[int] = ..., chunk_bytes: _Optional[int] = ...) -> None: ...

class TensorEntry(_message.Message):
    __slots__ = ("name", "dtype", "shape", "offset", "nbytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    nbytes: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., nbytes: _Optional[int] = ...) -> None: ...

class WeightsHeader(_message.Message):
    __slots__ = ("version", "tensors", "total_bytes", "adapter_config")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_CONFIG_FIELD_NUMBER: _ClassVar[int]
    version: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorEntry]
    total_bytes: int
    adapter_config: str
    def __init__(self, version: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorEntry, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., adapter_config: _Optional[str] = ...) -> None: ...

class WeightChunk(_message.Message):
    __slots__ = ("header", "data", "offset")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    header: WeightsHeader
    data: bytes
    offset: int
    def __init__(self, header: _Optional[_Union[WeightsHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., offset: _Optional[int] = ...) -> None: ...

class WatchVersionRequest(_message.Message):
    __slots__ = ("after_version",)
    AFTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    after_version: int
    def __init__(self, after_version: _Optional[int] = ...) -> None: ...

class VersionUpdate(_message.Message):
    __slots__ = ("policy_version", "step", "done")
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    policy_version: int
    step: int
    done: bool
    def __init__(self, policy_version: _Optional[int] = ..., step: _Optional[int] = ..., done: _Optional[bool] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LearnerStatus(_message.Message):
    __slots__ = ("step", "policy_version", "reward_mean", "held_out_accuracy", "last_checkpoint", "mlflow_run_id", "phase", "total_steps", "baseline_accuracy", "trajectories", "step_time_s", "message", "validation_accuracy", "best_checkpoint", "best_validation_accuracy", "worker_policy_versions", "staleness", "last_weight_sync_s")
    class WorkerPolicyVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    REWARD_MEAN_FIELD_NUMBER: _ClassVar[int]
    HELD_OUT_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    LAST_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    MLFLOW_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    BASELINE_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    TRAJECTORIES_FIELD_NUMBER: _ClassVar[int]
    STEP_TIME_S_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    BEST_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    BEST_VALIDATION_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    WORKER_POLICY_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    LAST_WEIGHT_SYNC_S_FIELD_NUMBER: _ClassVar[int]
    step: int
    policy_version: int
    reward_mean: float
    held_out_accuracy: float
    last_checkpoint: str
    mlflow_run_id: str
    phase: str
    total_steps: int
    baseline_accuracy: float
    trajectories: int
    step_time_s: float
    message: str
    validation_accuracy: float
    best_checkpoint: str
    best_validation_accuracy: float
    worker_policy_versions: _containers.ScalarMap[str, int]
    staleness: int
    last_weight_sync_s: float
    def __init__(self, step: _Optional[int] = ..., policy_version: _Optional[int] = ..., reward_mean: _Optional[float] = ..., held_out_accuracy: _Optional[float] = ..., last_checkpoint: _Optional[str] = ..., mlflow_run_id: _Optional[str] = ..., phase: _Optional[str] = ..., total_steps: _Optional[int] = ..., baseline_accuracy: _Optional[float] = ..., trajectories: _Optional[int] = ..., step_time_s: _Optional[float] = ..., message: _Optional[str] = ..., validation_accuracy: _Optional[float] = ..., best_checkpoint: _Optional[str] = ..., best_validation_accuracy: _Optional[float] = ..., worker_policy_versions: _Optional[_Mapping[str, int]] = ..., staleness: _Optional[int] = ..., last_weight_sync_s: _Optional[float] = ...) -> None: ...
