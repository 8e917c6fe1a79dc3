"""How a decision picks its actions, slot by slot, and the exact probability of each pick.

The presenting walk (``decision/contact.PRESENT``, or ``select`` in-process) fills the slots one at a
time. At each slot the *feasible set* is every candidate the walk could still show (not cut by a contact
limit, a budget, or a group already shown), in the ranking's order. The logging policy is epsilon-greedy
per slot: with probability ``1 - epsilon`` the slot takes the first feasible candidate (the ranking's
choice), with probability ``epsilon`` one drawn uniformly from the feasible set, so

    P(pick) = (1 - epsilon) x [pick is the first] + epsilon / |feasible set|

and a decision's probability is the product over its slots (each slot draws independently). Feasibility
only shrinks as slots fill (limits count the decision's own actions, budgets are consumed, groups are
taken), and the walk judges it with the state the slot sees, so the product is the exact probability of
the ordered slate under the logging policy, given the state the script read. A decision that shows
nothing but the channel's fallback has probability 1.

The draws are a hash of the customer, the exploration period and the slot (``draws``): the same customer
in the same state gets the same answer on every channel and server process within a period (one voice),
and a retried call (a cluster's budget claims) walks the same way. ``epsilon`` is 0 for a decision that
does not explore (no ``epsilon`` strategy, the control group unless configured, a named ranking): every
probability is then 1.
"""

from __future__ import annotations

import hashlib

_SCALE = float(1 << 64)


def draws(customer_id: str, period: int, slots: int) -> list[float]:
    """The uniform draws in [0, 1) of a decision's slots."""
    out = []
    for slot in range(slots):
        digest = hashlib.blake2b(f"slot:{period}:{slot}:{customer_id}".encode(), digest_size=8).digest()
        out.append(int.from_bytes(digest, "little") / _SCALE)
    return out


def pick(u: float, epsilon: float, size: int) -> int:
    """The index (0-based) in a feasible set of ``size`` that draw ``u`` picks."""
    if u < epsilon:
        return min(int(u / epsilon * size), size - 1)
    return 0


def slot_probability(epsilon: float, size: int, index: int) -> float:
    """The probability of picking the ``index``-th (0-based) of ``size`` feasible candidates."""
    return (1.0 - epsilon) * (index == 0) + epsilon / size


def slate_probability(epsilon: float, sets: list[list[str]], picks: list[str]) -> float:
    """The probability of the ordered ``picks`` given each slot's feasible set (in the ranking's order):
    0 when a pick was not feasible at its slot."""
    p = 1.0
    for feasible, chosen in zip(sets, picks):
        if chosen not in feasible:
            return 0.0
        p *= slot_probability(epsilon, len(feasible), feasible.index(chosen))
    return p
