from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OutputFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_FORMAT_UNSPECIFIED: _ClassVar[OutputFormat]
    FLOAT32: _ClassVar[OutputFormat]
    PNG: _ClassVar[OutputFormat]
OUTPUT_FORMAT_UNSPECIFIED: OutputFormat
FLOAT32: OutputFormat
PNG: OutputFormat

class SampleRequest(_message.Message):
    __slots__ = ("num_samples", "sampler", "num_steps", "seed", "labels", "guidance_scale", "output", "options", "model")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    num_samples: int
    sampler: str
    num_steps: int
    seed: int
    labels: _containers.RepeatedScalarFieldContainer[int]
    guidance_scale: float
    output: OutputFormat
    options: _containers.ScalarMap[str, float]
    model: str
    def __init__(self, num_samples: _Optional[int] = ..., sampler: _Optional[str] = ..., num_steps: _Optional[int] = ..., seed: _Optional[int] = ..., labels: _Optional[_Iterable[int]] = ..., guidance_scale: _Optional[float] = ..., output: _Optional[_Union[OutputFormat, str]] = ..., options: _Optional[_Mapping[str, float]] = ..., model: _Optional[str] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class SampleResponse(_message.Message):
    __slots__ = ("samples", "png", "checkpoint_step", "nfe")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_STEP_FIELD_NUMBER: _ClassVar[int]
    NFE_FIELD_NUMBER: _ClassVar[int]
    samples: Tensor
    png: _containers.RepeatedScalarFieldContainer[bytes]
    checkpoint_step: int
    nfe: int
    def __init__(self, samples: _Optional[_Union[Tensor, _Mapping]] = ..., png: _Optional[_Iterable[bytes]] = ..., checkpoint_step: _Optional[int] = ..., nfe: _Optional[int] = ...) -> None: ...

class SampleBatch(_message.Message):
    __slots__ = ("indices", "samples", "png", "checkpoint_step")
    INDICES_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_STEP_FIELD_NUMBER: _ClassVar[int]
    indices: _containers.RepeatedScalarFieldContainer[int]
    samples: Tensor
    png: _containers.RepeatedScalarFieldContainer[bytes]
    checkpoint_step: int
    def __init__(self, indices: _Optional[_Iterable[int]] = ..., samples: _Optional[_Union[Tensor, _Mapping]] = ..., png: _Optional[_Iterable[bytes]] = ..., checkpoint_step: _Optional[int] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("config_json", "sample_shape", "num_classes", "samplers", "default_sampler", "default_steps", "max_steps", "max_samples_per_request", "checkpoint_step", "process", "data_min", "data_max", "name")
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    SAMPLERS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_SAMPLER_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_SAMPLES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_STEP_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    DATA_MIN_FIELD_NUMBER: _ClassVar[int]
    DATA_MAX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    config_json: str
    sample_shape: _containers.RepeatedScalarFieldContainer[int]
    num_classes: int
    samplers: _containers.RepeatedScalarFieldContainer[str]
    default_sampler: str
    default_steps: int
    max_steps: int
    max_samples_per_request: int
    checkpoint_step: int
    process: str
    data_min: float
    data_max: float
    name: str
    def __init__(self, config_json: _Optional[str] = ..., sample_shape: _Optional[_Iterable[int]] = ..., num_classes: _Optional[int] = ..., samplers: _Optional[_Iterable[str]] = ..., default_sampler: _Optional[str] = ..., default_steps: _Optional[int] = ..., max_steps: _Optional[int] = ..., max_samples_per_request: _Optional[int] = ..., checkpoint_step: _Optional[int] = ..., process: _Optional[str] = ..., data_min: _Optional[float] = ..., data_max: _Optional[float] = ..., name: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelList(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class GetServerStatusRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ServerStatus(_message.Message):
    __slots__ = ("batch_slots", "busy_slots", "queued_requests", "max_queued_requests", "steps_run", "requests_completed", "requests_cancelled", "samples_completed", "checkpoint_step", "reloads")
    BATCH_SLOTS_FIELD_NUMBER: _ClassVar[int]
    BUSY_SLOTS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    STEPS_RUN_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_CANCELLED_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_STEP_FIELD_NUMBER: _ClassVar[int]
    RELOADS_FIELD_NUMBER: _ClassVar[int]
    batch_slots: int
    busy_slots: int
    queued_requests: int
    max_queued_requests: int
    steps_run: int
    requests_completed: int
    requests_cancelled: int
    samples_completed: int
    checkpoint_step: int
    reloads: int
    def __init__(self, batch_slots: _Optional[int] = ..., busy_slots: _Optional[int] = ..., queued_requests: _Optional[int] = ..., max_queued_requests: _Optional[int] = ..., steps_run: _Optional[int] = ..., requests_completed: _Optional[int] = ..., requests_cancelled: _Optional[int] = ..., samples_completed: _Optional[int] = ..., checkpoint_step: _Optional[int] = ..., reloads: _Optional[int] = ...) -> None: ...
