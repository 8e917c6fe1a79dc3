"""One voice within an interaction: what a decision stores for its interaction id, read back by a repeat.

A Decide with an interaction id (a call id, a web session + page view) stores its decision in the
customer's interaction hash (``engine.decision.contact.interaction_key``), one field per placement
(touchpoint + max actions): a JSON header (the decision's id, versions, channel, mode and flags) and
the actions as they were returned. The same placement asked again within the window gets that decision
back; another placement is a new decision that does not contradict the earlier placements' top actions
(no rival action of the same group).
"""

from __future__ import annotations

import json
from dataclasses import asdict

from engine.decision.arbitration import RankedAction

FIELD_PREFIX = "d:"


def placement(touchpoint: str, max_actions: int) -> str:
    return f"{touchpoint}|{max_actions}"


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
    """Group -> action id of the top action of every placement stored for the interaction, but ``skip``."""
    out: dict[str, str] = {}
    for name, body in stored.items():
        if name.startswith(FIELD_PREFIX) and name != skip:
            actions = json.loads(body)["a"]
            if actions:
                out.setdefault(actions[0]["group"], actions[0]["action_id"])
    return out
