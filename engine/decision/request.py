"""A Decide request as the decision core takes it, and its validation (errors name the field)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from engine.errors import NbaError
from engine.features import FeatureSchema

MAX_ACTIONS_LIMIT = 20
DEFAULT_MAX_ACTIONS = 3
MAX_ID_LENGTH = 128


class InvalidRequest(NbaError, ValueError):
    """A request the caller must fix; ``field`` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


# A google.protobuf.Timestamp's range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z
MIN_TIMESTAMP_SECONDS, MAX_TIMESTAMP_SECONDS = -62_135_596_800, 253_402_300_799


def utc_text(ts: float) -> str:
    """An epoch time as RFC 3339 UTC to the second (as the messages of errors show times)."""
    try:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (ValueError, OverflowError, OSError):  # past year 9999 (a Timestamp's last nanosecond rounds up)
        return f"{ts:.0f} s after 1970"


def timestamp_seconds(seconds: int, nanos: int, name: str = "timestamp") -> float:
    """A Timestamp's seconds and nanos as epoch seconds; INVALID_ARGUMENT naming ``name`` when it is no
    valid Timestamp."""
    if not 0 <= nanos <= 999_999_999:
        raise InvalidRequest(name, f"nanos {nanos:,} is not within 0 to 999,999,999")
    if not MIN_TIMESTAMP_SECONDS <= seconds <= MAX_TIMESTAMP_SECONDS:
        raise InvalidRequest(name, f"seconds {seconds:,} is not within years 0001 to 9999 "
                                   f"({MIN_TIMESTAMP_SECONDS:,} to {MAX_TIMESTAMP_SECONDS:,})")
    return seconds + nanos / 1e9


def check_not_ahead(ts: float, now: float, skew: float, name: str = "timestamp") -> None:
    """The one wording of a time too far ahead of the server clock, for every RPC that takes one."""
    if ts > now + skew:
        raise InvalidRequest(name, f"{utc_text(ts)} is {ts - now:,.0f} s ahead of the server clock "
                                   f"(at most {skew:,g} s)")


@dataclass(frozen=True)
class DecideInput:
    customer_id: str
    channel: str
    touchpoint: str = ""
    context: Mapping[str, str] = field(default_factory=dict)
    max_actions: int = 0  # 0: DEFAULT_MAX_ACTIONS
    explain: bool = False
    ranking: str = ""  # "": the service's (ranked, or the control policy); else DecisionEngine.rankings[name]
    fallback: bool = True  # False: an empty answer rather than the fallback action (outbound from events)
    interaction_id: str = ""  # the same customer + interaction id + placement gets the same decision back
    preview: bool = False  # decide without side effects: no impression, budget, record or log
    deadline: float = 0.0  # time.monotonic() by which the caller needs the answer (0: none)


def validate(req: DecideInput, schema: FeatureSchema) -> int:
    """Raise InvalidRequest naming the field; return the effective max_actions. Channels are those
    ``schema`` (the rule snapshot's domain.yaml) declares."""
    if not req.customer_id or not req.customer_id.strip():
        raise InvalidRequest("customer_id", "must not be empty")
    if len(req.customer_id) > MAX_ID_LENGTH or any(c in req.customer_id for c in "{}\n\r\t "):
        raise InvalidRequest("customer_id", f"at most {MAX_ID_LENGTH} characters, no spaces or braces")
    if req.channel not in schema.channel_names:
        raise InvalidRequest("channel", f"unknown channel {req.channel[:64]!r}; declared channels: "
                             + ", ".join(schema.channel_names))
    if not 0 <= req.max_actions <= MAX_ACTIONS_LIMIT:
        raise InvalidRequest(
            "max_actions", f"must be between 1 and {MAX_ACTIONS_LIMIT} (0 for the default {DEFAULT_MAX_ACTIONS})"
        )
    if req.interaction_id and (len(req.interaction_id) > MAX_ID_LENGTH
                               or any(c in req.interaction_id for c in "{}\n\r\t |")):
        raise InvalidRequest("interaction_id", f"at most {MAX_ID_LENGTH} characters, no spaces, braces or '|'")
    if len(req.touchpoint) > 256:
        raise InvalidRequest("touchpoint", "at most 256 characters")
    if len(req.context) > 64:
        raise InvalidRequest("context", "at most 64 entries")
    return req.max_actions or DEFAULT_MAX_ACTIONS
