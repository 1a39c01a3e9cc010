from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExecuteLimits(_message.Message):
    __slots__ = ("wall_time_s", "cpu_time_s", "memory_bytes", "max_processes", "max_file_bytes", "max_output_bytes", "max_open_files")
    WALL_TIME_S_FIELD_NUMBER: _ClassVar[int]
    CPU_TIME_S_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_PROCESSES_FIELD_NUMBER: _ClassVar[int]
    MAX_FILE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_OPEN_FILES_FIELD_NUMBER: _ClassVar[int]
    wall_time_s: float
    cpu_time_s: float
    memory_bytes: int
    max_processes: int
    max_file_bytes: int
    max_output_bytes: int
    max_open_files: int
    def __init__(self, wall_time_s: _Optional[float] = ..., cpu_time_s: _Optional[float] = ..., memory_bytes: _Optional[int] = ..., max_processes: _Optional[int] = ..., max_file_bytes: _Optional[int] = ..., max_output_bytes: _Optional[int] = ..., max_open_files: _Optional[int] = ...) -> None: ...

class ExecuteRequest(_message.Message):
    __slots__ = ("code", "limits")
    CODE_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    code: str
    limits: ExecuteLimits
    def __init__(self, code: _Optional[str] = ..., limits: _Optional[_Union[ExecuteLimits, _Mapping]] = ...) -> None: ...

class ExecuteResult(_message.Message):
    __slots__ = ("stdout", "stderr", "exit_code", "ok", "error_kind", "truncated", "duration_s", "message", "isolation")
    STDOUT_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_KIND_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ISOLATION_FIELD_NUMBER: _ClassVar[int]
    stdout: str
    stderr: str
    exit_code: int
    ok: bool
    error_kind: str
    truncated: bool
    duration_s: float
    message: str
    isolation: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, stdout: _Optional[str] = ..., stderr: _Optional[str] = ..., exit_code: _Optional[int] = ..., ok: _Optional[bool] = ..., error_kind: _Optional[str] = ..., truncated: _Optional[bool] = ..., duration_s: _Optional[float] = ..., message: _Optional[str] = ..., isolation: _Optional[_Iterable[str]] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("serving", "active", "max_concurrency")
    SERVING_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    serving: bool
    active: int
    max_concurrency: int
    def __init__(self, serving: _Optional[bool] = ..., active: _Optional[int] = ..., max_concurrency: _Optional[int] = ...) -> None: ...
