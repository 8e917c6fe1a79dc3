"""The same Decide sequence through one source tree's servicer, one JSON line per answer: run it on two
trees (before and after a change meant to change no behaviour) and compare the files.

A fresh embedded Redis seeded with 3,000 demo customers, the engine as ``nba serve`` builds it
(contact policies, budgets, decision log) on a clock that moves 7 s per request, so hot customers
(half the traffic on 50) run into contact limits and budgets; requests draw channel, max_actions,
explain (20%) and interaction ids (20%) from a fixed seed. The random decision id is left out.

    python loadtest/same_decisions.py /tmp/before 5000 /tmp/before.jsonl
    python loadtest/same_decisions.py . 5000 /tmp/after.jsonl && cmp /tmp/before.jsonl /tmp/after.jsonl
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
from types import SimpleNamespace
from typing import Any

from engine.sim.telco import SCHEMA


def main() -> int:
    root, calls, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    sys.path.insert(0, root)
    from google.protobuf.json_format import MessageToDict

    from engine.api.nba.v1 import nba_pb2 as pb
    from engine.decision.funnel import DecisionEngine
    from engine.live import Live
    from engine.models.registry import ModelRegistry
    from engine.rules.runtime import load_and_compile
    from engine.serving.server import DecisionServicer
    from engine.sim import demo
    from engine.store.decision_log import DecisionLog
    from engine.store.profiles import ProfileStore
    from engine.store.redis_embedded import EmbeddedRedis

    class Context:
        def time_remaining(self) -> None:
            return None

        def abort(self, code: Any, message: str) -> None:
            raise RuntimeError(f"{code}: {message}")

    now = [1_781_524_800.0]  # noon UTC: no quiet hours at first
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(tmp, persist=False) as redis_server:
        store = ProfileStore.from_url(redis_server.url)
        demo.seed(store, 3000)
        rules = Live(load_and_compile(f"{root}/rules"), retire=lambda r: r.close())
        model = Live(ModelRegistry(sys.argv[4] if len(sys.argv) > 4 else "/tmp/nba-models", SCHEMA).load())
        engine = DecisionEngine(store, rules, model, DecisionLog(store.client), contacts=True, clock=lambda: now[0])
        engine.warmup()

        # all it uses of an App for Decide: the engine, and the rules (the declared channels; older trees ignore them)
        servicer = DecisionServicer(SimpleNamespace(engine=engine, rules=rules))  # type: ignore[arg-type]
        rng = random.Random(7)
        channels = [pb.CHANNEL_WEB, pb.CHANNEL_MOBILE_APP, pb.CHANNEL_CALL_CENTER, pb.CHANNEL_EMAIL, pb.CHANNEL_SMS,
                    pb.CHANNEL_BRANCH]
        with open(out, "w") as f:
            for i in range(calls):
                now[0] += 7.0
                r = rng.random()
                cid = f"C{rng.randrange(50 if r < 0.5 else 3000):07d}" if r >= 0.05 else f"NEW-{i}"
                req = pb.DecideRequest(customer_id=cid, channel=rng.choice(channels), touchpoint="t",
                                       max_actions=rng.choice([0, 1, 3]), explain=rng.random() < 0.2,
                                       interaction_id=f"ix{rng.randrange(200)}" if rng.random() < 0.2 else "")
                answer = MessageToDict(servicer.Decide(req, Context()))
                answer.pop("decisionId", None)
                f.write(json.dumps(answer, sort_keys=True) + "\n")
        rules.current.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
