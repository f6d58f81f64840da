import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ActRequest(_message.Message):
    __slots__ = ("obs", "seq", "reward", "terminated", "truncated", "applied_action", "final_obs", "episode_start")
    OBS_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    TERMINATED_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    APPLIED_ACTION_FIELD_NUMBER: _ClassVar[int]
    FINAL_OBS_FIELD_NUMBER: _ClassVar[int]
    EPISODE_START_FIELD_NUMBER: _ClassVar[int]
    obs: _containers.RepeatedScalarFieldContainer[float]
    seq: int
    reward: float
    terminated: bool
    truncated: bool
    applied_action: _containers.RepeatedScalarFieldContainer[float]
    final_obs: _containers.RepeatedScalarFieldContainer[float]
    episode_start: bool
    def __init__(self, obs: _Optional[_Iterable[float]] = ..., seq: _Optional[int] = ..., reward: _Optional[float] = ..., terminated: _Optional[bool] = ..., truncated: _Optional[bool] = ..., applied_action: _Optional[_Iterable[float]] = ..., final_obs: _Optional[_Iterable[float]] = ..., episode_start: _Optional[bool] = ...) -> None: ...

class ActResponse(_message.Message):
    __slots__ = ("action", "seq", "policy_version", "error", "explored")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    EXPLORED_FIELD_NUMBER: _ClassVar[int]
    action: _containers.RepeatedScalarFieldContainer[float]
    seq: int
    policy_version: int
    error: Error
    explored: bool
    def __init__(self, action: _Optional[_Iterable[float]] = ..., seq: _Optional[int] = ..., policy_version: _Optional[int] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., explored: _Optional[bool] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ActBatchRequest(_message.Message):
    __slots__ = ("obs", "batch_size", "seq")
    OBS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    obs: _containers.RepeatedScalarFieldContainer[float]
    batch_size: int
    seq: int
    def __init__(self, obs: _Optional[_Iterable[float]] = ..., batch_size: _Optional[int] = ..., seq: _Optional[int] = ...) -> None: ...

class ActBatchResponse(_message.Message):
    __slots__ = ("actions", "batch_size", "act_dim", "seq", "policy_version")
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    ACT_DIM_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    actions: _containers.RepeatedScalarFieldContainer[float]
    batch_size: int
    act_dim: int
    seq: int
    policy_version: int
    def __init__(self, actions: _Optional[_Iterable[float]] = ..., batch_size: _Optional[int] = ..., act_dim: _Optional[int] = ..., seq: _Optional[int] = ..., policy_version: _Optional[int] = ...) -> None: ...

class GetPolicyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ObsField(_message.Message):
    __slots__ = ("name", "size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class PolicyInfo(_message.Message):
    __slots__ = ("version", "env_id", "obs_dim", "act_dim", "action_low", "action_high", "obs_layout", "algo", "train_steps", "eval_return", "created_utc", "loaded_at", "source", "sha256", "max_delta", "previous_version", "metadata", "local_loops")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ENV_ID_FIELD_NUMBER: _ClassVar[int]
    OBS_DIM_FIELD_NUMBER: _ClassVar[int]
    ACT_DIM_FIELD_NUMBER: _ClassVar[int]
    ACTION_LOW_FIELD_NUMBER: _ClassVar[int]
    ACTION_HIGH_FIELD_NUMBER: _ClassVar[int]
    OBS_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    ALGO_FIELD_NUMBER: _ClassVar[int]
    TRAIN_STEPS_FIELD_NUMBER: _ClassVar[int]
    EVAL_RETURN_FIELD_NUMBER: _ClassVar[int]
    CREATED_UTC_FIELD_NUMBER: _ClassVar[int]
    LOADED_AT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    MAX_DELTA_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    LOCAL_LOOPS_FIELD_NUMBER: _ClassVar[int]
    version: int
    env_id: str
    obs_dim: int
    act_dim: int
    action_low: _containers.RepeatedScalarFieldContainer[float]
    action_high: _containers.RepeatedScalarFieldContainer[float]
    obs_layout: _containers.RepeatedCompositeFieldContainer[ObsField]
    algo: str
    train_steps: int
    eval_return: float
    created_utc: str
    loaded_at: _timestamp_pb2.Timestamp
    source: str
    sha256: str
    max_delta: float
    previous_version: int
    metadata: _containers.ScalarMap[str, str]
    local_loops: _containers.RepeatedCompositeFieldContainer[LocalLoop]
    def __init__(self, version: _Optional[int] = ..., env_id: _Optional[str] = ..., obs_dim: _Optional[int] = ..., act_dim: _Optional[int] = ..., action_low: _Optional[_Iterable[float]] = ..., action_high: _Optional[_Iterable[float]] = ..., obs_layout: _Optional[_Iterable[_Union[ObsField, _Mapping]]] = ..., algo: _Optional[str] = ..., train_steps: _Optional[int] = ..., eval_return: _Optional[float] = ..., created_utc: _Optional[str] = ..., loaded_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., source: _Optional[str] = ..., sha256: _Optional[str] = ..., max_delta: _Optional[float] = ..., previous_version: _Optional[int] = ..., metadata: _Optional[_Mapping[str, str]] = ..., local_loops: _Optional[_Iterable[_Union[LocalLoop, _Mapping]]] = ...) -> None: ...

class LocalLoop(_message.Message):
    __slots__ = ("client_id", "peer", "connected", "applied_version", "applied_sha256", "refused_version", "refused_error", "acked_at")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    APPLIED_VERSION_FIELD_NUMBER: _ClassVar[int]
    APPLIED_SHA256_FIELD_NUMBER: _ClassVar[int]
    REFUSED_VERSION_FIELD_NUMBER: _ClassVar[int]
    REFUSED_ERROR_FIELD_NUMBER: _ClassVar[int]
    ACKED_AT_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    peer: str
    connected: bool
    applied_version: int
    applied_sha256: str
    refused_version: int
    refused_error: str
    acked_at: _timestamp_pb2.Timestamp
    def __init__(self, client_id: _Optional[str] = ..., peer: _Optional[str] = ..., connected: _Optional[bool] = ..., applied_version: _Optional[int] = ..., applied_sha256: _Optional[str] = ..., refused_version: _Optional[int] = ..., refused_error: _Optional[str] = ..., acked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class WatchPolicyRequest(_message.Message):
    __slots__ = ("client_id", "running_version", "running_sha256")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    RUNNING_VERSION_FIELD_NUMBER: _ClassVar[int]
    RUNNING_SHA256_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    running_version: int
    running_sha256: str
    def __init__(self, client_id: _Optional[str] = ..., running_version: _Optional[int] = ..., running_sha256: _Optional[str] = ...) -> None: ...

class PolicyUpdate(_message.Message):
    __slots__ = ("nonce", "version", "sha256", "onnx", "action_low", "action_high", "max_delta", "explore_std", "explore_clip", "finetune", "source", "server_id")
    NONCE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    ONNX_FIELD_NUMBER: _ClassVar[int]
    ACTION_LOW_FIELD_NUMBER: _ClassVar[int]
    ACTION_HIGH_FIELD_NUMBER: _ClassVar[int]
    MAX_DELTA_FIELD_NUMBER: _ClassVar[int]
    EXPLORE_STD_FIELD_NUMBER: _ClassVar[int]
    EXPLORE_CLIP_FIELD_NUMBER: _ClassVar[int]
    FINETUNE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    nonce: str
    version: int
    sha256: str
    onnx: bytes
    action_low: _containers.RepeatedScalarFieldContainer[float]
    action_high: _containers.RepeatedScalarFieldContainer[float]
    max_delta: float
    explore_std: float
    explore_clip: float
    finetune: bool
    source: str
    server_id: str
    def __init__(self, nonce: _Optional[str] = ..., version: _Optional[int] = ..., sha256: _Optional[str] = ..., onnx: _Optional[bytes] = ..., action_low: _Optional[_Iterable[float]] = ..., action_high: _Optional[_Iterable[float]] = ..., max_delta: _Optional[float] = ..., explore_std: _Optional[float] = ..., explore_clip: _Optional[float] = ..., finetune: _Optional[bool] = ..., source: _Optional[str] = ..., server_id: _Optional[str] = ...) -> None: ...

class PolicyAck(_message.Message):
    __slots__ = ("client_id", "nonce", "version", "sha256", "applied", "error")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    nonce: str
    version: int
    sha256: str
    applied: bool
    error: str
    def __init__(self, client_id: _Optional[str] = ..., nonce: _Optional[str] = ..., version: _Optional[int] = ..., sha256: _Optional[str] = ..., applied: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class AckPolicyResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LoadPolicyRequest(_message.Message):
    __slots__ = ("path", "onnx")
    PATH_FIELD_NUMBER: _ClassVar[int]
    ONNX_FIELD_NUMBER: _ClassVar[int]
    path: str
    onnx: bytes
    def __init__(self, path: _Optional[str] = ..., onnx: _Optional[bytes] = ...) -> None: ...

class RollbackPolicyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Transition(_message.Message):
    __slots__ = ("obs", "action", "reward", "next_obs", "terminated", "truncated", "policy_version", "episode_return")
    OBS_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    NEXT_OBS_FIELD_NUMBER: _ClassVar[int]
    TERMINATED_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    EPISODE_RETURN_FIELD_NUMBER: _ClassVar[int]
    obs: _containers.RepeatedScalarFieldContainer[float]
    action: _containers.RepeatedScalarFieldContainer[float]
    reward: float
    next_obs: _containers.RepeatedScalarFieldContainer[float]
    terminated: bool
    truncated: bool
    policy_version: int
    episode_return: float
    def __init__(self, obs: _Optional[_Iterable[float]] = ..., action: _Optional[_Iterable[float]] = ..., reward: _Optional[float] = ..., next_obs: _Optional[_Iterable[float]] = ..., terminated: _Optional[bool] = ..., truncated: _Optional[bool] = ..., policy_version: _Optional[int] = ..., episode_return: _Optional[float] = ...) -> None: ...

class ReportTransitionsResponse(_message.Message):
    __slots__ = ("accepted", "rejected", "dropped", "first_error")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    FIRST_ERROR_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    rejected: int
    dropped: int
    first_error: str
    def __init__(self, accepted: _Optional[int] = ..., rejected: _Optional[int] = ..., dropped: _Optional[int] = ..., first_error: _Optional[str] = ...) -> None: ...

class FinetuneControlRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FinetuneStatus(_message.Message):
    __slots__ = ("paused", "learner_alive", "transitions_received", "transitions_rejected", "transitions_dropped", "updates", "actor_updates", "candidates", "promotions", "refusals", "last_refusal", "rollbacks", "judging_version", "judging_episodes", "current_mean_return", "current_episodes", "explore_std", "versions_dir", "learner_error")
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    LEARNER_ALIVE_FIELD_NUMBER: _ClassVar[int]
    TRANSITIONS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    TRANSITIONS_REJECTED_FIELD_NUMBER: _ClassVar[int]
    TRANSITIONS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    ACTOR_UPDATES_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    PROMOTIONS_FIELD_NUMBER: _ClassVar[int]
    REFUSALS_FIELD_NUMBER: _ClassVar[int]
    LAST_REFUSAL_FIELD_NUMBER: _ClassVar[int]
    ROLLBACKS_FIELD_NUMBER: _ClassVar[int]
    JUDGING_VERSION_FIELD_NUMBER: _ClassVar[int]
    JUDGING_EPISODES_FIELD_NUMBER: _ClassVar[int]
    CURRENT_MEAN_RETURN_FIELD_NUMBER: _ClassVar[int]
    CURRENT_EPISODES_FIELD_NUMBER: _ClassVar[int]
    EXPLORE_STD_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_DIR_FIELD_NUMBER: _ClassVar[int]
    LEARNER_ERROR_FIELD_NUMBER: _ClassVar[int]
    paused: bool
    learner_alive: bool
    transitions_received: int
    transitions_rejected: int
    transitions_dropped: int
    updates: int
    actor_updates: int
    candidates: int
    promotions: int
    refusals: int
    last_refusal: str
    rollbacks: int
    judging_version: int
    judging_episodes: int
    current_mean_return: float
    current_episodes: int
    explore_std: float
    versions_dir: str
    learner_error: str
    def __init__(self, paused: _Optional[bool] = ..., learner_alive: _Optional[bool] = ..., transitions_received: _Optional[int] = ..., transitions_rejected: _Optional[int] = ..., transitions_dropped: _Optional[int] = ..., updates: _Optional[int] = ..., actor_updates: _Optional[int] = ..., candidates: _Optional[int] = ..., promotions: _Optional[int] = ..., refusals: _Optional[int] = ..., last_refusal: _Optional[str] = ..., rollbacks: _Optional[int] = ..., judging_version: _Optional[int] = ..., judging_episodes: _Optional[int] = ..., current_mean_return: _Optional[float] = ..., current_episodes: _Optional[int] = ..., explore_std: _Optional[float] = ..., versions_dir: _Optional[str] = ..., learner_error: _Optional[str] = ...) -> None: ...
