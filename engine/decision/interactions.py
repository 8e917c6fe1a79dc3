"""One voice within an interaction: what a decision stores for its interaction id, read back by a repeat.

A Decide with an interaction id (a call id, a web session + page view) stores its decision in the
customer's interaction hash (``engine.decision.contact.interaction_key``), one field per placement
(touchpoint + max actions): a JSON header (the decision's id, versions, channel, mode and flags) and
the actions as they were returned. The same placement asked again within the window gets that decision
back; another placement is a new decision that does not contradict the earlier placements' top actions
(no rival action of the same group).

The request's ``context`` is part of the field (a digest after ``#``): what the customer said changes the
question (``intent=cancel`` learnt mid-call), so the same placement with another context is decided anew,
and stored beside the earlier one; that earlier decision of the same placement does not constrain it
(one voice holds across placements, not across contexts of one placement). The same context again gets its
own stored decision back.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict

from engine.decision.arbitration import RankedAction

FIELD_PREFIX = "d:"


DIGEST_CHARS = 16


def placement(touchpoint: str, max_actions: int, context: Mapping[str, str] | None = None) -> str:
    """``<touchpoint>|<max actions>``, then ``#<digest of the context>`` when there is one."""
    base = f"{touchpoint}|{max_actions}"
    if not context:
        return base
    canonical = json.dumps(sorted(context.items()), separators=(",", ":"), ensure_ascii=False)
    return f"{base}#{hashlib.sha256(canonical.encode()).hexdigest()[:DIGEST_CHARS]}"


def without_context(name: str) -> str:
    """A stored field (or placement) less its context digest."""
    tail = name[-DIGEST_CHARS - 1:]
    if len(name) > len(tail) and tail[0] == "#" and all(c in "0123456789abcdef" for c in tail[1:]):
        return name[:-DIGEST_CHARS - 1]
    return name


def action_body(action: RankedAction) -> str:
    """A ranked action as stored (its rank is its place in the list)."""
    d = asdict(action)
    del d["rank"]
    return json.dumps(d, separators=(",", ":"))


def header(**fields: object) -> str:
    return json.dumps(fields, separators=(",", ":"))


def read(body: str) -> tuple[dict, list[RankedAction]]:
    """(header, actions) of a stored decision."""
    stored = json.loads(body)
    return stored["h"], [RankedAction(**a, rank=i + 1) for i, a in enumerate(stored["a"])]


def tops(stored: dict[str, str], skip: str) -> dict[str, str]:
    """Group -> action id of the top action of every placement stored for the interaction, but ``skip``'s
    (in whatever context)."""
    out: dict[str, str] = {}
    same = without_context(skip)
    for name, body in stored.items():
        if name.startswith(FIELD_PREFIX) and without_context(name) != same:
            actions = json.loads(body)["a"]
            if actions:
                out.setdefault(actions[0]["group"], actions[0]["action_id"])
    return out
