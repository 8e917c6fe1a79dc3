"""The presenting script's Redis time against the size of one customer's contact history.

Customers with 1, 10, 100, 1,000 and 10,000 impressions in their history (written by the presenting
script itself, deciding with no limits on a clock 1 to 29 days back), either all on one day or spread
over 29 days, over 10 demo actions (without a daily budget) on 3 channels. Then the script judges 10 candidates against
``rules/contact.yaml`` (a preview: it reads and counts, writes nothing) for each customer in turn, in
blocks of ``--calls`` calls, the order of the customers reversed every round so that machine noise
hits all alike; the time per call is the ``INFO commandstats`` EVALSHA delta of the block. Runs on
whatever code is on ``PYTHONPATH`` (before and after a change of the history layout).

``--against FILE`` also times another version of the presenting script (the Lua text in FILE, e.g. an
earlier commit's ``PRESENT``) on the same histories in the same process: every block runs once with
each script, their order alternating, and the table gets its time and the ratio.

    python loadtest/history_probe.py --json /tmp/history_probe.json
    PYTHONPATH=<old checkout> python -c "from engine.decision.contact import PRESENT; print(PRESENT)" > /tmp/present-old.lua
    python loadtest/history_probe.py --against /tmp/present-old.lua
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.store.redis_embedded import EmbeddedRedis  # noqa: E402

NOW = datetime(2030, 6, 15, 12, tzinfo=UTC).timestamp()
SIZES = (1, 10, 100, 1_000, 10_000)
CHANNELS = ("call_center", "branch", "email")


class Verdict:
    def __init__(self, action: object) -> None:
        self.action = action


def usec(client) -> tuple[int, int]:
    s = client.info("commandstats").get("cmdstat_evalsha", {})
    return int(s.get("calls", 0)), int(s.get("usec", 0))


def run(rounds: int, calls: int, against: str | None = None) -> dict:
    import redis

    from engine.decision.contact import PRESENT, present_args
    from engine.rules.contact import ContactLimit, ContactRules
    from engine.rules.runtime import load_and_compile

    rules = load_and_compile(ROOT / "rules")
    contact = rules.ruleset.contact
    actions = [a for a in rules.ruleset.actions if "call_center" in a.channels and a.daily_budget is None][:10]
    # writing: no limit that stops a contact, but the history kept 30 days as the demo rules keep it
    keep = ContactRules((ContactLimit("keep_30_days", 10**9, 30, counts="acceptances"),))
    candidates = [(1.0 - i / 100, 0.5, Verdict(a)) for i, a in enumerate(actions)]
    customers = {f"{spread}-{n}": (spread, n) for spread in ("1 day", "29 days") for n in SIZES}
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(tmp, persist=False) as server:
        client = redis.Redis.from_url(server.url)  # the service user runs the scripts, as the service does
        admin = redis.Redis.from_url(server.admin_url)  # INFO and MEMORY USAGE are beyond its ACL
        scripts = {"this": client.register_script(PRESENT)}
        if against:
            scripts["against"] = client.register_script(against)
        k = 0
        for cid, (spread, n) in customers.items():
            for i in range(n):
                k += 1
                at = NOW - 3600 - (i % 29) * 86_400 * (spread != "1 day") - (i % 97)
                a = actions[i % len(actions)]
                keys, args, _ = present_args(keep, [(1.0, 0.5, Verdict(a))], None, 1, CHANNELS[i % 3],
                                             f"{k:032x}", at, {"customer": cid}, cid, "decide")
                scripts["this"](keys=keys, args=[args])
        times: dict[str, dict[str, list[float]]] = {cid: {name: [] for name in scripts} for cid in customers}
        order = list(customers)
        for r in range(rounds):
            for cid in (order if r % 2 == 0 else order[::-1]):
                for name in (list(scripts) if r % 2 == 0 else list(scripts)[::-1]):
                    before = usec(admin)
                    for j in range(calls):
                        keys, args, _ = present_args(contact, candidates, None, 3, CHANNELS[j % 3], f"p{r}{j}", NOW,
                                                     {"customer": cid}, cid, "dry")
                        scripts[name](keys=keys, args=[args])
                    after = usec(admin)
                    times[cid][name].append((after[1] - before[1]) / (after[0] - before[0]))
        sizes = {cid: int(admin.memory_usage(f"nba:{{c:{cid}}}:contacts", samples=0) or 0) for cid in customers}
        client.close()
        admin.close()
    rules.close()
    out = {}
    for cid, t in times.items():
        row = out[cid] = {"spread": customers[cid][0], "impressions": customers[cid][1], "key_bytes": sizes[cid]}
        for name, prefix in (("this", ""), ("against", "against_")):
            if name in t:
                row[f"{prefix}us_per_call"] = round(float(np.median(t[name])), 1)
                row[f"{prefix}us_per_call_rounds"] = [round(x, 1) for x in t[name]]
        if against:
            row["this_over_against"] = round(float(np.median(np.divide(t["this"], t["against"]))), 3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--calls", type=int, default=300, help="script calls per customer and round")
    ap.add_argument("--against", metavar="FILE", help="another presenting script (Lua) to time alongside")
    ap.add_argument("--json")
    args = ap.parse_args()
    table = run(args.rounds, args.calls, Path(args.against).read_text() if args.against else None)
    print(f"{'history':>8} {'impressions':>12} {'us/call (median of rounds)':>27} {'key bytes':>10}"
          + (f" {'--against us/call':>18} {'ratio (median of rounds)':>25}" if args.against else ""))
    for row in table.values():
        print(f"{row['spread']:>8} {row['impressions']:>12,} {row['us_per_call']:>27.1f} {row['key_bytes']:>10,}"
              + (f" {row['against_us_per_call']:>18.1f} {row['this_over_against']:>25.3f}" if args.against else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
