from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OperationState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OPERATION_STATE_UNSPECIFIED: _ClassVar[OperationState]
    OPERATION_STATE_QUEUED: _ClassVar[OperationState]
    OPERATION_STATE_VERIFYING: _ClassVar[OperationState]
    OPERATION_STATE_BUILDING: _ClassVar[OperationState]
    OPERATION_STATE_VALIDATING: _ClassVar[OperationState]
    OPERATION_STATE_ACTIVATING: _ClassVar[OperationState]
    OPERATION_STATE_SUCCEEDED: _ClassVar[OperationState]
    OPERATION_STATE_FAILED: _ClassVar[OperationState]

class VersionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERSION_STATE_UNSPECIFIED: _ClassVar[VersionState]
    VERSION_STATE_STAGING: _ClassVar[VersionState]
    VERSION_STATE_STAGED: _ClassVar[VersionState]
    VERSION_STATE_ACTIVATING: _ClassVar[VersionState]
    VERSION_STATE_ACTIVE: _ClassVar[VersionState]
    VERSION_STATE_INACTIVE: _ClassVar[VersionState]
    VERSION_STATE_FAILED: _ClassVar[VersionState]
OPERATION_STATE_UNSPECIFIED: OperationState
OPERATION_STATE_QUEUED: OperationState
OPERATION_STATE_VERIFYING: OperationState
OPERATION_STATE_BUILDING: OperationState
OPERATION_STATE_VALIDATING: OperationState
OPERATION_STATE_ACTIVATING: OperationState
OPERATION_STATE_SUCCEEDED: OperationState
OPERATION_STATE_FAILED: OperationState
VERSION_STATE_UNSPECIFIED: VersionState
VERSION_STATE_STAGING: VersionState
VERSION_STATE_STAGED: VersionState
VERSION_STATE_ACTIVATING: VersionState
VERSION_STATE_ACTIVE: VersionState
VERSION_STATE_INACTIVE: VersionState
VERSION_STATE_FAILED: VersionState

class UploadChunk(_message.Message):
    __slots__ = ("sha256", "total_size", "offset", "data")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    total_size: int
    offset: int
    data: bytes
    def __init__(self, sha256: _Optional[str] = ..., total_size: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class GetUploadRequest(_message.Message):
    __slots__ = ("sha256",)
    SHA256_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    def __init__(self, sha256: _Optional[str] = ...) -> None: ...

class CheckBundleRequest(_message.Message):
    __slots__ = ("model", "version", "total_size", "sha256")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    total_size: int
    sha256: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., total_size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class CheckBundleResponse(_message.Message):
    __slots__ = ("received", "max_bundle_bytes")
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    MAX_BUNDLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    received: int
    max_bundle_bytes: int
    def __init__(self, received: _Optional[int] = ..., max_bundle_bytes: _Optional[int] = ...) -> None: ...

class UploadStatus(_message.Message):
    __slots__ = ("sha256", "total_size", "received", "complete")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    total_size: int
    received: int
    complete: bool
    def __init__(self, sha256: _Optional[str] = ..., total_size: _Optional[int] = ..., received: _Optional[int] = ..., complete: _Optional[bool] = ...) -> None: ...

class StageRequest(_message.Message):
    __slots__ = ("upload_sha256", "auto_activate")
    UPLOAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    AUTO_ACTIVATE_FIELD_NUMBER: _ClassVar[int]
    upload_sha256: str
    auto_activate: bool
    def __init__(self, upload_sha256: _Optional[str] = ..., auto_activate: _Optional[bool] = ...) -> None: ...

class ValidationReport(_message.Message):
    __slots__ = ("passed", "task", "samples", "scores", "thresholds", "failures")
    class ScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class ThresholdsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    PASSED_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    passed: bool
    task: str
    samples: int
    scores: _containers.ScalarMap[str, float]
    thresholds: _containers.ScalarMap[str, float]
    failures: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, passed: _Optional[bool] = ..., task: _Optional[str] = ..., samples: _Optional[int] = ..., scores: _Optional[_Mapping[str, float]] = ..., thresholds: _Optional[_Mapping[str, float]] = ..., failures: _Optional[_Iterable[str]] = ...) -> None: ...

class Operation(_message.Message):
    __slots__ = ("id", "kind", "model", "version", "state", "done", "progress", "error", "upload_sha256", "auto_activate", "stage_seconds", "validation", "created", "updated")
    class StageSecondsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    AUTO_ACTIVATE_FIELD_NUMBER: _ClassVar[int]
    STAGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: str
    model: str
    version: int
    state: OperationState
    done: bool
    progress: str
    error: str
    upload_sha256: str
    auto_activate: bool
    stage_seconds: _containers.ScalarMap[str, float]
    validation: ValidationReport
    created: float
    updated: float
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., state: _Optional[_Union[OperationState, str]] = ..., done: _Optional[bool] = ..., progress: _Optional[str] = ..., error: _Optional[str] = ..., upload_sha256: _Optional[str] = ..., auto_activate: _Optional[bool] = ..., stage_seconds: _Optional[_Mapping[str, float]] = ..., validation: _Optional[_Union[ValidationReport, _Mapping]] = ..., created: _Optional[float] = ..., updated: _Optional[float] = ...) -> None: ...

class GetOperationRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListOperationsRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ListOperationsResponse(_message.Message):
    __slots__ = ("operations",)
    OPERATIONS_FIELD_NUMBER: _ClassVar[int]
    operations: _containers.RepeatedCompositeFieldContainer[Operation]
    def __init__(self, operations: _Optional[_Iterable[_Union[Operation, _Mapping]]] = ...) -> None: ...

class WatchOperationsRequest(_message.Message):
    __slots__ = ("id", "model")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    id: str
    model: str
    def __init__(self, id: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class ActivateRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class DeleteVersionRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class VersionStatus(_message.Message):
    __slots__ = ("version", "state", "serving_state", "reason", "precision", "engine_id", "calibration_cache_id", "validation", "signer", "bundle_sha256", "staged", "activated")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SERVING_STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_CACHE_ID_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_FIELD_NUMBER: _ClassVar[int]
    SIGNER_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_SHA256_FIELD_NUMBER: _ClassVar[int]
    STAGED_FIELD_NUMBER: _ClassVar[int]
    ACTIVATED_FIELD_NUMBER: _ClassVar[int]
    version: int
    state: VersionState
    serving_state: str
    reason: str
    precision: str
    engine_id: str
    calibration_cache_id: str
    validation: ValidationReport
    signer: str
    bundle_sha256: str
    staged: float
    activated: float
    def __init__(self, version: _Optional[int] = ..., state: _Optional[_Union[VersionState, str]] = ..., serving_state: _Optional[str] = ..., reason: _Optional[str] = ..., precision: _Optional[str] = ..., engine_id: _Optional[str] = ..., calibration_cache_id: _Optional[str] = ..., validation: _Optional[_Union[ValidationReport, _Mapping]] = ..., signer: _Optional[str] = ..., bundle_sha256: _Optional[str] = ..., staged: _Optional[float] = ..., activated: _Optional[float] = ...) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("name", "active_version", "previous_version", "versions")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    active_version: int
    previous_version: int
    versions: _containers.RepeatedCompositeFieldContainer[VersionStatus]
    def __init__(self, name: _Optional[str] = ..., active_version: _Optional[int] = ..., previous_version: _Optional[int] = ..., versions: _Optional[_Iterable[_Union[VersionStatus, _Mapping]]] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ...) -> None: ...
