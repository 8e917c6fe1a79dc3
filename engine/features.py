"""The feature schema: what a customer profile holds, the channels and the action types of one business.

Nothing here names a business noun: a rule directory declares its domain in ``domain.yaml`` and
``engine/rules/domain.py`` loads it into a ``FeatureSchema``, which every layer takes from the rule
snapshot (facts, the model input, the derived-feature kernel, the Redis packing).

Stored numeric and date attributes are packed into one float32 vector in Redis (declaration order;
dates as days since 1970-01-01 UTC). Categorical attributes hold one level of a declared list; set
attributes hold members of a declared list. ``consent`` is a set every schema has: the channels the
customer consented to. Derived features are computed per decision from the packed vector by one numba
kernel running the program compiled from their formulas (``engine/models/derived.py``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property

SCHEMA_VERSION = 1  # the packing of a profile hash (``engine/store/profiles.py``), not the domain
CONSENT = "consent"  # the set of channels a customer consented to, in every schema


@dataclass(frozen=True)
class Channel:
    """``inbound``: the customer comes to us (a call, a visit, a page); a customer nobody knows yet
    is taken to consent to it. ``outbound``: we send (a message, a push); outbound channels are under
    quiet hours unless ``quiet_hours`` is False. A channel may be both (an app)."""

    name: str
    inbound: bool
    outbound: bool = False
    quiet_hours: bool = True
    description: str = ""


@dataclass(frozen=True)
class ActionType:
    """``needs_consent`` False exempts the type from the built-in consent policy (service messages);
    ``quiet_hours`` False lets its actions out during quiet hours (an alert that cannot wait)."""

    name: str
    needs_consent: bool = True
    quiet_hours: bool = True
    description: str = ""


# Opcodes of a derived-feature program (argument in brackets). Division by 0 gives 0, the log of a
# number not above 0 gives 0, ``days_since`` of an unknown date (NaN) gives its fallback.
OP_CONST, OP_STORED, OP_DERIVED, OP_SAVE = 0, 1, 2, 3  # push [value], push stored [i], push derived [i], pop into derived [i]
OP_ADD, OP_SUB, OP_MUL, OP_DIV, OP_NEG = 4, 5, 6, 7, 8
OP_MIN, OP_MAX, OP_EXP, OP_LOG, OP_ABS, OP_CLAMP = 9, 10, 11, 12, 13, 14  # CLAMP pops x, low, high
OP_BUCKET, OP_BUCKET_DOWN, OP_DAYS_SINCE = 15, 16, 17  # BUCKET [cut list]; DAYS_SINCE pops date, fallback


@dataclass(frozen=True)
class Program:
    """Derived features as one postfix program run per customer by ``engine/models/derived.py``:
    ``code`` holds (opcode, argument) pairs; ``cuts`` the cut-point lists of the bucket opcodes."""

    code: tuple[tuple[int, float], ...] = ()
    cuts: tuple[tuple[float, ...], ...] = ()
    depth: int = 1  # the deepest the stack gets


@dataclass(frozen=True, eq=False)
class FeatureSchema:
    """Names, types, defaults and documentation the rule language, the model and the store use."""

    numeric: tuple[str, ...] = ()  # stored numbers and dates, in packed-vector order
    derived: tuple[str, ...] = ()
    categorical: dict[str, tuple[str, ...]] = field(default_factory=dict)
    sets: dict[str, tuple[str, ...]] = field(default_factory=dict)  # includes ``consent``
    channels: tuple[Channel, ...] = ()
    action_types: tuple[ActionType, ...] = ()
    dates: frozenset[str] = frozenset()  # which of ``numeric`` are dates (days since 1970-01-01)
    defaults: dict[str, float | str] = field(default_factory=dict)  # numbers and categories; "" or 0 if absent
    bounds: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)  # numbers: (min, max)
    docs: dict[str, str] = field(default_factory=dict)  # attribute, derived feature -> description
    formulas: dict[str, str] = field(default_factory=dict)  # derived feature -> its formula as written
    program: Program = field(default_factory=Program)
    version: int = SCHEMA_VERSION

    @property
    def numbers(self) -> tuple[str, ...]:
        """Every numeric name a rule may use: stored then derived."""
        return self.numeric + self.derived

    @cached_property
    def channel_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.channels)

    @cached_property
    def inbound_channels(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.channels if c.inbound)

    @cached_property
    def outbound_channels(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.channels if c.outbound)

    @cached_property
    def quiet_channels(self) -> tuple[str, ...]:
        """Outbound channels that quiet hours must cover."""
        return tuple(c.name for c in self.channels if c.outbound and c.quiet_hours)

    @cached_property
    def type_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.action_types)

    @cached_property
    def service_types(self) -> frozenset[str]:
        """Types that are customer care, not offers: no marketing consent needed, never withheld from
        the control group (``needs_consent: false``)."""
        return frozenset(t.name for t in self.action_types if not t.needs_consent)

    @cached_property
    def quiet_exempt_types(self) -> frozenset[str]:
        """Types whose actions may go out during quiet hours (``quiet_hours: false``)."""
        return frozenset(t.name for t in self.action_types if not t.quiet_hours)

    @cached_property
    def products(self) -> tuple[str, ...]:
        """Members of the ``products`` set (what ``holds("...")`` tests), () when none is declared."""
        return self.sets.get("products", ())

    def default_vector(self) -> list[float]:
        """The stored numeric vector of a customer nobody knows (declared defaults, else 0)."""
        return [float(self.defaults.get(name, 0.0)) for name in self.numeric]

    def layout(self) -> str:
        """A short hash of the packed-vector order: profiles record it so a later schema reads them by name."""
        return self._layout

    def fingerprint(self) -> str:
        """A short hash that changes whenever names, order or levels change (models record it)."""
        return self._fingerprint

    @cached_property
    def _layout(self) -> str:
        return hashlib.sha256("\0".join(self.numeric).encode()).hexdigest()[:12]

    @cached_property
    def _fingerprint(self) -> str:
        body = json.dumps(
            {
                "version": self.version,
                "numeric": self.numeric,
                "derived": self.derived,
                "categorical": self.categorical,
                "sets": self.sets,
            },
            sort_keys=True,
        )
        return hashlib.sha256(body.encode()).hexdigest()[:12]
