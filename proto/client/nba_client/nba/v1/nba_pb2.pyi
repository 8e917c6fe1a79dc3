import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Channel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHANNEL_UNSPECIFIED: _ClassVar[Channel]
    CHANNEL_CALL_CENTER: _ClassVar[Channel]
    CHANNEL_WEB: _ClassVar[Channel]
    CHANNEL_MOBILE_APP: _ClassVar[Channel]
    CHANNEL_EMAIL: _ClassVar[Channel]
    CHANNEL_SMS: _ClassVar[Channel]
    CHANNEL_BRANCH: _ClassVar[Channel]
    CHANNEL_POINT_OF_SALE: _ClassVar[Channel]

class ActionType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACTION_TYPE_UNSPECIFIED: _ClassVar[ActionType]
    ACTION_TYPE_UP_SELL: _ClassVar[ActionType]
    ACTION_TYPE_CROSS_SELL: _ClassVar[ActionType]
    ACTION_TYPE_BUNDLE: _ClassVar[ActionType]
    ACTION_TYPE_RETENTION: _ClassVar[ActionType]
    ACTION_TYPE_ACQUISITION: _ClassVar[ActionType]
    ACTION_TYPE_SERVICE: _ClassVar[ActionType]

class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTCOME_UNSPECIFIED: _ClassVar[Outcome]
    OUTCOME_IMPRESSION: _ClassVar[Outcome]
    OUTCOME_CLICKED: _ClassVar[Outcome]
    OUTCOME_ACCEPTED: _ClassVar[Outcome]
    OUTCOME_REJECTED: _ClassVar[Outcome]
    OUTCOME_IGNORED: _ClassVar[Outcome]
CHANNEL_UNSPECIFIED: Channel
CHANNEL_CALL_CENTER: Channel
CHANNEL_WEB: Channel
CHANNEL_MOBILE_APP: Channel
CHANNEL_EMAIL: Channel
CHANNEL_SMS: Channel
CHANNEL_BRANCH: Channel
CHANNEL_POINT_OF_SALE: Channel
ACTION_TYPE_UNSPECIFIED: ActionType
ACTION_TYPE_UP_SELL: ActionType
ACTION_TYPE_CROSS_SELL: ActionType
ACTION_TYPE_BUNDLE: ActionType
ACTION_TYPE_RETENTION: ActionType
ACTION_TYPE_ACQUISITION: ActionType
ACTION_TYPE_SERVICE: ActionType
OUTCOME_UNSPECIFIED: Outcome
OUTCOME_IMPRESSION: Outcome
OUTCOME_CLICKED: Outcome
OUTCOME_ACCEPTED: Outcome
OUTCOME_REJECTED: Outcome
OUTCOME_IGNORED: Outcome

class AttributeValue(_message.Message):
    __slots__ = ("number", "category", "date", "members", "clear")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    DATE_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    CLEAR_FIELD_NUMBER: _ClassVar[int]
    number: float
    category: str
    date: _timestamp_pb2.Timestamp
    members: Members
    clear: bool
    def __init__(self, number: _Optional[float] = ..., category: _Optional[str] = ..., date: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., members: _Optional[_Union[Members, _Mapping]] = ..., clear: _Optional[bool] = ...) -> None: ...

class Members(_message.Message):
    __slots__ = ("members",)
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    members: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, members: _Optional[_Iterable[str]] = ...) -> None: ...

class UpdateProfileRequest(_message.Message):
    __slots__ = ("customer_id", "attributes", "create_only")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: AttributeValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[AttributeValue, _Mapping]] = ...) -> None: ...
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    CREATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    attributes: _containers.MessageMap[str, AttributeValue]
    create_only: bool
    def __init__(self, customer_id: _Optional[str] = ..., attributes: _Optional[_Mapping[str, AttributeValue]] = ..., create_only: _Optional[bool] = ...) -> None: ...

class UpdateProfileResponse(_message.Message):
    __slots__ = ("created", "changed")
    CREATED_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    created: bool
    changed: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, created: _Optional[bool] = ..., changed: _Optional[_Iterable[str]] = ...) -> None: ...

class DecideRequest(_message.Message):
    __slots__ = ("customer_id", "channel", "touchpoint", "context", "max_actions", "explain", "interaction_id", "preview", "channel_name")
    class ContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    TOUCHPOINT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    MAX_ACTIONS_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    INTERACTION_ID_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_NAME_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    channel: Channel
    touchpoint: str
    context: _containers.ScalarMap[str, str]
    max_actions: int
    explain: bool
    interaction_id: str
    preview: bool
    channel_name: str
    def __init__(self, customer_id: _Optional[str] = ..., channel: _Optional[_Union[Channel, str]] = ..., touchpoint: _Optional[str] = ..., context: _Optional[_Mapping[str, str]] = ..., max_actions: _Optional[int] = ..., explain: _Optional[bool] = ..., interaction_id: _Optional[str] = ..., preview: _Optional[bool] = ..., channel_name: _Optional[str] = ...) -> None: ...

class Treatment(_message.Message):
    __slots__ = ("channel", "content", "channel_name")
    class ContentEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_NAME_FIELD_NUMBER: _ClassVar[int]
    channel: Channel
    content: _containers.ScalarMap[str, str]
    channel_name: str
    def __init__(self, channel: _Optional[_Union[Channel, str]] = ..., content: _Optional[_Mapping[str, str]] = ..., channel_name: _Optional[str] = ...) -> None: ...

class RankedAction(_message.Message):
    __slots__ = ("action_id", "name", "type", "group", "propensity", "value", "priority", "treatment", "reasons", "rank", "campaign", "type_name")
    ACTION_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    PROPENSITY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TREATMENT_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    CAMPAIGN_FIELD_NUMBER: _ClassVar[int]
    TYPE_NAME_FIELD_NUMBER: _ClassVar[int]
    action_id: str
    name: str
    type: ActionType
    group: str
    propensity: float
    value: float
    priority: float
    treatment: Treatment
    reasons: _containers.RepeatedScalarFieldContainer[str]
    rank: int
    campaign: str
    type_name: str
    def __init__(self, action_id: _Optional[str] = ..., name: _Optional[str] = ..., type: _Optional[_Union[ActionType, str]] = ..., group: _Optional[str] = ..., propensity: _Optional[float] = ..., value: _Optional[float] = ..., priority: _Optional[float] = ..., treatment: _Optional[_Union[Treatment, _Mapping]] = ..., reasons: _Optional[_Iterable[str]] = ..., rank: _Optional[int] = ..., campaign: _Optional[str] = ..., type_name: _Optional[str] = ...) -> None: ...

class FunnelEntry(_message.Message):
    __slots__ = ("action_id", "stage", "detail", "propensity", "priority")
    ACTION_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    PROPENSITY_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    action_id: str
    stage: str
    detail: str
    propensity: float
    priority: float
    def __init__(self, action_id: _Optional[str] = ..., stage: _Optional[str] = ..., detail: _Optional[str] = ..., propensity: _Optional[float] = ..., priority: _Optional[float] = ...) -> None: ...

class DecideResponse(_message.Message):
    __slots__ = ("decision_id", "actions", "ruleset_version", "model_version", "degraded", "cold_start", "situations", "funnel", "decided_at", "control_group", "repeat", "preview")
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    RULESET_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    COLD_START_FIELD_NUMBER: _ClassVar[int]
    SITUATIONS_FIELD_NUMBER: _ClassVar[int]
    FUNNEL_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_FIELD_NUMBER: _ClassVar[int]
    CONTROL_GROUP_FIELD_NUMBER: _ClassVar[int]
    REPEAT_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    decision_id: str
    actions: _containers.RepeatedCompositeFieldContainer[RankedAction]
    ruleset_version: str
    model_version: str
    degraded: bool
    cold_start: bool
    situations: _containers.RepeatedScalarFieldContainer[str]
    funnel: _containers.RepeatedCompositeFieldContainer[FunnelEntry]
    decided_at: _timestamp_pb2.Timestamp
    control_group: bool
    repeat: bool
    preview: bool
    def __init__(self, decision_id: _Optional[str] = ..., actions: _Optional[_Iterable[_Union[RankedAction, _Mapping]]] = ..., ruleset_version: _Optional[str] = ..., model_version: _Optional[str] = ..., degraded: _Optional[bool] = ..., cold_start: _Optional[bool] = ..., situations: _Optional[_Iterable[str]] = ..., funnel: _Optional[_Iterable[_Union[FunnelEntry, _Mapping]]] = ..., decided_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., control_group: _Optional[bool] = ..., repeat: _Optional[bool] = ..., preview: _Optional[bool] = ...) -> None: ...

class RecordResponseRequest(_message.Message):
    __slots__ = ("decision_id", "action_id", "outcome", "timestamp")
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    decision_id: str
    action_id: str
    outcome: Outcome
    timestamp: _timestamp_pb2.Timestamp
    def __init__(self, decision_id: _Optional[str] = ..., action_id: _Optional[str] = ..., outcome: _Optional[_Union[Outcome, str]] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RecordResponseResponse(_message.Message):
    __slots__ = ("response_id",)
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    response_id: str
    def __init__(self, response_id: _Optional[str] = ...) -> None: ...

class PublishEventRequest(_message.Message):
    __slots__ = ("event_id", "customer_id", "type", "attributes", "timestamp")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    customer_id: str
    type: str
    attributes: _containers.ScalarMap[str, str]
    timestamp: _timestamp_pb2.Timestamp
    def __init__(self, event_id: _Optional[str] = ..., customer_id: _Optional[str] = ..., type: _Optional[str] = ..., attributes: _Optional[_Mapping[str, str]] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class PublishEventResponse(_message.Message):
    __slots__ = ("stream_id", "duplicate", "patterns", "triggers_raised", "triggers_cleared", "outbound")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    PATTERNS_FIELD_NUMBER: _ClassVar[int]
    TRIGGERS_RAISED_FIELD_NUMBER: _ClassVar[int]
    TRIGGERS_CLEARED_FIELD_NUMBER: _ClassVar[int]
    OUTBOUND_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    duplicate: bool
    patterns: _containers.RepeatedScalarFieldContainer[str]
    triggers_raised: _containers.RepeatedScalarFieldContainer[str]
    triggers_cleared: _containers.RepeatedScalarFieldContainer[str]
    outbound: _containers.RepeatedCompositeFieldContainer[OutboundAction]
    def __init__(self, stream_id: _Optional[str] = ..., duplicate: _Optional[bool] = ..., patterns: _Optional[_Iterable[str]] = ..., triggers_raised: _Optional[_Iterable[str]] = ..., triggers_cleared: _Optional[_Iterable[str]] = ..., outbound: _Optional[_Iterable[_Union[OutboundAction, _Mapping]]] = ...) -> None: ...

class OutboundAction(_message.Message):
    __slots__ = ("action_id", "channel", "pattern", "status", "decision_id", "reason", "channel_name")
    ACTION_ID_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    PATTERN_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_NAME_FIELD_NUMBER: _ClassVar[int]
    action_id: str
    channel: Channel
    pattern: str
    status: str
    decision_id: str
    reason: str
    channel_name: str
    def __init__(self, action_id: _Optional[str] = ..., channel: _Optional[_Union[Channel, str]] = ..., pattern: _Optional[str] = ..., status: _Optional[str] = ..., decision_id: _Optional[str] = ..., reason: _Optional[str] = ..., channel_name: _Optional[str] = ...) -> None: ...

class ForgetCustomerRequest(_message.Message):
    __slots__ = ("customer_id",)
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    def __init__(self, customer_id: _Optional[str] = ...) -> None: ...

class ForgetCustomerResponse(_message.Message):
    __slots__ = ("keys_deleted", "stream_entries_deleted", "members_removed", "job_id")
    KEYS_DELETED_FIELD_NUMBER: _ClassVar[int]
    STREAM_ENTRIES_DELETED_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_REMOVED_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    keys_deleted: int
    stream_entries_deleted: int
    members_removed: int
    job_id: str
    def __init__(self, keys_deleted: _Optional[int] = ..., stream_entries_deleted: _Optional[int] = ..., members_removed: _Optional[int] = ..., job_id: _Optional[str] = ...) -> None: ...

class ExportCustomerRequest(_message.Message):
    __slots__ = ("customer_id",)
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    def __init__(self, customer_id: _Optional[str] = ...) -> None: ...

class ExportCustomerResponse(_message.Message):
    __slots__ = ("json", "job_id")
    JSON_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    json: str
    job_id: str
    def __init__(self, json: _Optional[str] = ..., job_id: _Optional[str] = ...) -> None: ...

class GetCustomerJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CustomerJob(_message.Message):
    __slots__ = ("job_id", "kind", "state", "customer_pseudonym", "keys_deleted", "stream_entries_deleted", "members_removed", "budget_units_returned", "failures", "persistence", "json", "created_at", "finished_at", "requested_by", "archive_rows_deleted")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_PSEUDONYM_FIELD_NUMBER: _ClassVar[int]
    KEYS_DELETED_FIELD_NUMBER: _ClassVar[int]
    STREAM_ENTRIES_DELETED_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_REMOVED_FIELD_NUMBER: _ClassVar[int]
    BUDGET_UNITS_RETURNED_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    PERSISTENCE_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_BY_FIELD_NUMBER: _ClassVar[int]
    ARCHIVE_ROWS_DELETED_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    kind: str
    state: str
    customer_pseudonym: str
    keys_deleted: int
    stream_entries_deleted: int
    members_removed: int
    budget_units_returned: int
    failures: _containers.RepeatedScalarFieldContainer[str]
    persistence: str
    json: str
    created_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    requested_by: str
    archive_rows_deleted: int
    def __init__(self, job_id: _Optional[str] = ..., kind: _Optional[str] = ..., state: _Optional[str] = ..., customer_pseudonym: _Optional[str] = ..., keys_deleted: _Optional[int] = ..., stream_entries_deleted: _Optional[int] = ..., members_removed: _Optional[int] = ..., budget_units_returned: _Optional[int] = ..., failures: _Optional[_Iterable[str]] = ..., persistence: _Optional[str] = ..., json: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., requested_by: _Optional[str] = ..., archive_rows_deleted: _Optional[int] = ...) -> None: ...

class ReloadRulesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadRulesResponse(_message.Message):
    __slots__ = ("applied", "ruleset_version", "errors")
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    RULESET_VERSION_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    applied: bool
    ruleset_version: str
    errors: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, applied: _Optional[bool] = ..., ruleset_version: _Optional[str] = ..., errors: _Optional[_Iterable[str]] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("ruleset_version", "ruleset_loaded_at", "model_version", "model_loaded_at", "redis_ok", "redis_detail", "catalog_size", "service_version", "worker_pid", "experiment_mode", "challenger_version", "challenger_share", "exploration_strategy", "exploration_share", "campaigns", "rules_dir", "rules_watch_seconds", "ruleset_files_digest", "rules_refused")
    RULESET_VERSION_FIELD_NUMBER: _ClassVar[int]
    RULESET_LOADED_AT_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_LOADED_AT_FIELD_NUMBER: _ClassVar[int]
    REDIS_OK_FIELD_NUMBER: _ClassVar[int]
    REDIS_DETAIL_FIELD_NUMBER: _ClassVar[int]
    CATALOG_SIZE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_VERSION_FIELD_NUMBER: _ClassVar[int]
    WORKER_PID_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_MODE_FIELD_NUMBER: _ClassVar[int]
    CHALLENGER_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHALLENGER_SHARE_FIELD_NUMBER: _ClassVar[int]
    EXPLORATION_STRATEGY_FIELD_NUMBER: _ClassVar[int]
    EXPLORATION_SHARE_FIELD_NUMBER: _ClassVar[int]
    CAMPAIGNS_FIELD_NUMBER: _ClassVar[int]
    RULES_DIR_FIELD_NUMBER: _ClassVar[int]
    RULES_WATCH_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RULESET_FILES_DIGEST_FIELD_NUMBER: _ClassVar[int]
    RULES_REFUSED_FIELD_NUMBER: _ClassVar[int]
    ruleset_version: str
    ruleset_loaded_at: _timestamp_pb2.Timestamp
    model_version: str
    model_loaded_at: _timestamp_pb2.Timestamp
    redis_ok: bool
    redis_detail: str
    catalog_size: int
    service_version: str
    worker_pid: int
    experiment_mode: str
    challenger_version: str
    challenger_share: float
    exploration_strategy: str
    exploration_share: float
    campaigns: _containers.RepeatedCompositeFieldContainer[CampaignStatus]
    rules_dir: str
    rules_watch_seconds: float
    ruleset_files_digest: str
    rules_refused: RulesRefused
    def __init__(self, ruleset_version: _Optional[str] = ..., ruleset_loaded_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., model_version: _Optional[str] = ..., model_loaded_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., redis_ok: _Optional[bool] = ..., redis_detail: _Optional[str] = ..., catalog_size: _Optional[int] = ..., service_version: _Optional[str] = ..., worker_pid: _Optional[int] = ..., experiment_mode: _Optional[str] = ..., challenger_version: _Optional[str] = ..., challenger_share: _Optional[float] = ..., exploration_strategy: _Optional[str] = ..., exploration_share: _Optional[float] = ..., campaigns: _Optional[_Iterable[_Union[CampaignStatus, _Mapping]]] = ..., rules_dir: _Optional[str] = ..., rules_watch_seconds: _Optional[float] = ..., ruleset_files_digest: _Optional[str] = ..., rules_refused: _Optional[_Union[RulesRefused, _Mapping]] = ...) -> None: ...

class RulesRefused(_message.Message):
    __slots__ = ("at", "ruleset_version", "files_digest", "errors")
    AT_FIELD_NUMBER: _ClassVar[int]
    RULESET_VERSION_FIELD_NUMBER: _ClassVar[int]
    FILES_DIGEST_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    at: _timestamp_pb2.Timestamp
    ruleset_version: str
    files_digest: str
    errors: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ruleset_version: _Optional[str] = ..., files_digest: _Optional[str] = ..., errors: _Optional[_Iterable[str]] = ...) -> None: ...

class CampaignStatus(_message.Message):
    __slots__ = ("name", "objective", "owner", "live", "start", "end", "total_budget", "daily_budget", "spent", "spent_today", "budget_left", "even_spend", "pacing")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BUDGET_FIELD_NUMBER: _ClassVar[int]
    DAILY_BUDGET_FIELD_NUMBER: _ClassVar[int]
    SPENT_FIELD_NUMBER: _ClassVar[int]
    SPENT_TODAY_FIELD_NUMBER: _ClassVar[int]
    BUDGET_LEFT_FIELD_NUMBER: _ClassVar[int]
    EVEN_SPEND_FIELD_NUMBER: _ClassVar[int]
    PACING_FIELD_NUMBER: _ClassVar[int]
    name: str
    objective: str
    owner: str
    live: bool
    start: _timestamp_pb2.Timestamp
    end: _timestamp_pb2.Timestamp
    total_budget: int
    daily_budget: int
    spent: int
    spent_today: int
    budget_left: int
    even_spend: float
    pacing: float
    def __init__(self, name: _Optional[str] = ..., objective: _Optional[str] = ..., owner: _Optional[str] = ..., live: _Optional[bool] = ..., start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., total_budget: _Optional[int] = ..., daily_budget: _Optional[int] = ..., spent: _Optional[int] = ..., spent_today: _Optional[int] = ..., budget_left: _Optional[int] = ..., even_spend: _Optional[float] = ..., pacing: _Optional[float] = ...) -> None: ...
