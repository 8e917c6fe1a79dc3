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

from dataclasses import dataclass

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


class ContactBook:
    """One customer's replayed contact history, judged like ``decision/contact.PRESENT``."""

    def __init__(self, limits: tuple[ContactLimit, ...]) -> None:
        self.limits = limits
        self.history: list[_Contact] = []
        self._applicable: dict[tuple[str, str], list[ContactLimit]] = {}
        self._keep = max((limit.days for limit in limits), default=0.0) * DAY

    def allows(self, action, channel: str, t: float) -> bool:
        key = (action.id, channel)
        limits = self._applicable.get(key)
        if limits is None:
            limits = self._applicable[key] = [limit for limit in self.limits if limit.applies(action, channel)]
        for limit in limits:
            kind, since = KINDS[limit.counts], t - limit.days * DAY
            n = 0
            for c in self.history:
                if (c.kind == kind and c.t >= since and limit.counts_contact(c.action, c.group, c.type, c.channel)
                        and (limit.per == "customer" or (limit.per == "action" and c.action == action.id)
                             or (limit.per == "group" and c.group == action.group))):
                    n += 1
            if n >= limit.max:
                return False
        return True

    def add(self, kind: str, action, channel: str, t: float) -> None:
        if self.history and self.history[0].t < t - self._keep:  # older than every limit's window
            self.history = [c for c in self.history if c.t >= t - self._keep]
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
    # every draw at once: decisions per day, their times, channels and the customer's answers
    counts = rng.binomial(per_day, min(total / per_day, 1.0), size=days) if per_day else rng.poisson(total, size=days)
    n = int(counts.sum())
    if n == 0:
        return out
    days_of = np.repeat(np.arange(days), counts)
    times = start + days_of * DAY + rng.random(n) * DAY
    order_ = np.argsort(times, kind="stable")
    picks = rng.choice(len(channels), size=n, p=share)
    answers = rng.random((n, max_actions, 2))
    for k, j in enumerate(order_.tolist()):
        t, day, channel = float(times[j]), int(days_of[j]), channels[int(picks[k])]
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
        for m, (_, p, v) in enumerate(shown):
            action = v.action
            book.add("i", action, channel, t)
            accepted = bool(answers[k, m, 0] < p)
            if accepted:
                book.add("a", action, channel, t)
                taken.add(action.id)  # held now: the rules would not offer it again
            elif answers[k, m, 1] < reject_share:
                book.add("r", action, channel, t)
            if action.id in mine:
                out.append(Shown(day, action.id, accepted, action.value))
    return out
