"""The plan's replay of one customer's coming decisions under the contact policies (``nba campaign plan``).

A campaign's action is shown when it is on top, and what is on top changes as the customer is contacted:
an offer shown ``max`` times in ``days`` is held back (``no_repeats``), a rejected one cools down, an
accepted one is not offered again. So the plan does not count one snapshot decision per customer; it
replays each eligible customer's expected decisions over the campaign's days: how many per day and on
which channel (the measured traffic, Poisson), each ranked as the funnel ranks (the rule stage and the
model's priority, computed once per channel), judged against the customer's replayed contact history by
the limits of contact.yaml as the presenting script judges them, accepted with the model's propensity,
and rejected (when not accepted) with the share of rejections measured on the response stream. Nothing
here knows how customers really respond: only what the service itself knows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.decision.contact import control_order
from engine.rules.contact import KINDS, ContactLimit, ControlGroup

DAY = 86_400.0


@dataclass
class _Contact:
    kind: str  # i | r | a
    action: str
    group: str
    type: str
    channel: str
    t: float


@dataclass
class ContactBook:
    """One customer's replayed contact history, judged like ``decision/contact.PRESENT``."""

    limits: tuple[ContactLimit, ...]
    history: list[_Contact] = field(default_factory=list)

    def allows(self, action, channel: str, t: float) -> bool:
        for limit in self.limits:
            if not limit.applies(action, channel):
                continue
            kind, since = KINDS[limit.counts], t - limit.days * DAY
            n = 0
            for c in self.history:
                if (c.kind == kind and c.t >= since and (not limit.channels or c.channel in limit.channels)
                        and (not limit.types or c.type in limit.types)
                        and (limit.per == "customer" or (limit.per == "action" and c.action == action.id)
                             or (limit.per == "group" and c.group == action.group))):
                    n += 1
            if n >= limit.max:
                return False
        return True

    def add(self, kind: str, action, channel: str, t: float) -> None:
        self.history.append(_Contact(kind, action.id, action.group, action.type, channel, t))


@dataclass
class Shown:
    day: int
    action: str
    accepted: bool
    value: float


def replay(ranked: dict[str, list], traffic: dict[str, float], days: int, start: float, mine: set[str],
           limits: tuple[ContactLimit, ...], max_actions: int, reject_share: float, rng: np.random.Generator,
           customer_id: str, control: ControlGroup | None = None, rate: float | None = None,
           per_day: int = 0) -> list[Shown]:
    """The campaign's presentations to one customer in one replay of ``days`` days from ``start``.
    ``ranked``: per channel, the candidates ``(priority, propensity, verdict)`` in the funnel's order;
    ``traffic``: the channels' shares of decisions; ``rate``: this customer's decisions per day (default:
    the sum of ``traffic``); ``per_day``: at most that many decisions a day (binomial; 0: Poisson)."""
    channels = [ch for ch in traffic if ch in ranked and traffic[ch] > 0]
    if not channels:
        return []
    rates = np.array([traffic[ch] for ch in channels])
    share = rates / rates.sum()
    total = float(rates.sum()) if rate is None else rate
    in_control = control is not None and control.contains(customer_id)
    book = ContactBook(limits)
    taken: set[str] = set()
    out: list[Shown] = []
    for day in range(days):
        n = int(rng.binomial(per_day, min(total / per_day, 1.0))) if per_day else int(rng.poisson(total))
        for t in np.sort(start + day * DAY + rng.random(n) * DAY).tolist():
            channel = channels[int(rng.choice(len(channels), p=share))]
            candidates = ranked[channel]
            if control is not None and in_control:
                candidates = control_order(control, candidates, customer_id, t)
            groups: set[str] = set()
            shown: list = []
            for c in candidates:
                action = c[2].action
                if len(shown) >= max_actions:
                    break
                if action.group in groups or action.id in taken or not book.allows(action, channel, t):
                    continue
                groups.add(action.group)
                shown.append(c)
            for _, p, v in shown:
                action = v.action
                book.add("i", action, channel, t)
                accepted = bool(rng.random() < p)
                if accepted:
                    book.add("a", action, channel, t)
                    taken.add(action.id)  # held now: the rules would not offer it again
                elif rng.random() < reject_share:
                    book.add("r", action, channel, t)
                if action.id in mine:
                    out.append(Shown(day, action.id, accepted, action.value))
    return out
