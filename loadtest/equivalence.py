"""Same requests, same decisions? Replays a recorded request log on the code on ``PYTHONPATH`` and
compares the outputs of two replays (e.g. before and after a change of the contact history).

``record`` writes ``--requests`` steps (JSON lines) on a fake clock spanning ``--days`` days in 2030, so
that every window of ``rules/contact.yaml`` (7, 14, 30 days) rolls: Decides with the load generator's
mix of hot customers (30% of requests on ``--hot`` customers), channels and intents, some within an
interaction (asked twice), and the responses a channel sends afterwards (impressions on web and app,
rejections, acceptances), addressed by the step that decided.

``replay`` runs a log in process on a fresh embedded Redis with the demo customers, the demo rules and
the model of ``--models-dir`` (contact policies and budgets on, ``explain``), and writes per Decide:
the actions in order with their propensities, degraded / control / repeat, and the whole funnel (where
every other action dropped out, with the contact policy and the count that stopped it). ``compare``
says how many decisions differ and shows the first ones.

    python loadtest/equivalence.py record /tmp/eq-requests.jsonl
    PYTHONPATH=<old checkout> python <old checkout>/loadtest/equivalence.py replay /tmp/eq-requests.jsonl /tmp/eq-old.jsonl
    python loadtest/equivalence.py replay /tmp/eq-requests.jsonl /tmp/eq-new.jsonl
    python loadtest/equivalence.py compare /tmp/eq-old.jsonl /tmp/eq-new.jsonl
    python loadtest/equivalence.py replay /tmp/eq-requests.jsonl /tmp/eq-cluster.jsonl --cluster  # the same on a cluster?
    python loadtest/equivalence.py replay ... --budget 20  # every offer with a daily budget, which runs out

``servicer`` sends a fixed Decide sequence through one source tree's gRPC servicer (``DecisionServicer.Decide``
in process: the request and answer messages as served) and writes one JSON line per answer, the random
decision id left out; run it on two trees (before and after a change meant to change no behaviour) and
compare the files. A fresh embedded Redis seeded with 3,000 demo customers, the engine as ``nba serve``
builds it (contact policies, budgets, decision log) with the tree's rules and ``--models-dir``'s model, on a
clock that moves 7 s per request, so hot customers (half the traffic on 50) run into contact limits and
budgets; requests draw channel, max_actions, explain (20%) and interaction ids (20%) from a fixed seed.

    python loadtest/equivalence.py servicer /tmp/before.jsonl --tree /tmp/before --calls 5000
    python loadtest/equivalence.py servicer /tmp/after.jsonl --calls 5000
    python loadtest/equivalence.py compare /tmp/before.jsonl /tmp/after.jsonl
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "loadtest"))

import loadgen  # noqa: E402
from harness import args as common  # noqa: E402

START = datetime(2030, 3, 1, tzinfo=UTC).timestamp()
CUSTOMERS = 2_000


def record(path: str, steps: int, days: float, hot: int, seed: int) -> None:
    rng = random.Random(seed)
    names = [name for name, _ in loadgen.CHANNEL_MIX]
    weights = [share for _, share in loadgen.CHANNEL_MIX]
    now, decides, lines = START, 0, []
    while decides < steps:
        now += rng.expovariate(steps / (days * 86_400))
        r = rng.random()
        cid = f"EQ-NEW-{decides}" if r < 0.05 else f"C{rng.randrange(hot if r < 0.35 else CUSTOMERS):07d}"
        name = rng.choices(names, weights)[0]
        intent = rng.choice(loadgen.INTENTS)
        step = {"decide": decides, "ts": round(now, 3), "customer_id": cid,
                "channel": "pos" if name == "CHANNEL_POINT_OF_SALE" else name.removeprefix("CHANNEL_").lower(),
                "touchpoint": loadgen.TOUCHPOINTS[name], "context": {"intent": intent} if intent else {},
                "max_actions": 3, "interaction_id": f"ix-{decides}" if rng.random() < 0.1 else ""}
        lines.append(step)
        decides += 1
        if step["interaction_id"] and rng.random() < 0.5:  # the same placement asked again, maybe elsewhere
            again = dict(step, decide=decides, ts=round(now + 30, 3), channel=rng.choice(("call_center", step["channel"])))
            lines.append(again)
            decides += 1
        for rank in range(3):  # what the channel reports, by rank in the answer of this step
            if step["channel"] in ("web", "mobile_app") and rng.random() < 0.8:
                lines.append({"respond": step["decide"], "rank": rank, "outcome": "impression", "ts": round(now + 5, 3)})
        if rng.random() < 0.15:
            lines.append({"respond": step["decide"], "rank": 0, "ts": round(now + 60, 3),
                          "outcome": "accepted" if rng.random() < 0.25 else "rejected"})
    Path(path).write_text("".join(json.dumps(x) + "\n" for x in lines))
    print(f"{decides} decides, {len(lines) - decides} responses over {days:g} days -> {path}")


def budgeted_rules(tmp: str, budget: int) -> Path:
    """The demo rules with a daily budget of ``budget`` on every offer (as tests/test_contact.py's)."""
    import shutil

    rules = Path(tmp) / "rules"
    shutil.copytree(ROOT / "rules", rules)
    lines = []
    for line in (rules / "catalog.yaml").read_text().splitlines():
        if not line.strip().startswith("daily_budget:"):
            lines.append(line)
            if line.startswith("    type: ") and line.split()[-1] != "service":
                lines.append(f"    daily_budget: {budget}")
    (rules / "catalog.yaml").write_text("\n".join(lines) + "\n")
    return rules


def replay(requests: str, out: str, models_dir: str, cluster: bool = False, budget: int = 0) -> None:
    from engine.decision.funnel import DecisionEngine
    from engine.decision.request import DecideInput
    from engine.live import Live
    from engine.models.registry import ModelRegistry
    from engine.rules.runtime import load_and_compile
    from engine.sim import demo
    from engine.sim.telco import SCHEMA
    from engine.store.profiles import ProfileStore
    from engine.store.redis_cluster import LocalCluster
    from engine.store.redis_embedded import EmbeddedRedis

    clock = {"now": START}
    steps = [json.loads(line) for line in Path(requests).read_text().splitlines()]
    rows, decided = [], {}
    with tempfile.TemporaryDirectory() as tmp, (LocalCluster(tmp) if cluster else EmbeddedRedis(tmp, persist=False)) as server:
        store = ProfileStore.from_url(server.url)
        demo.seed(store, CUSTOMERS)
        rules = Live(load_and_compile(budgeted_rules(tmp, budget) if budget else ROOT / "rules"),
                     retire=lambda r: r.close())
        engine = DecisionEngine(store, rules, Live(ModelRegistry(models_dir, SCHEMA).load()), clock=lambda: clock["now"])
        errors = 0
        for s in steps:
            clock["now"] = s["ts"]
            if "respond" in s:
                d = decided.get(s["respond"])
                if d is not None and s["rank"] < len(d.actions) and not d.repeat:
                    try:
                        engine.responses.record(d.decision_id, d.actions[s["rank"]].action_id, s["outcome"], s["ts"])
                    except Exception:  # noqa: BLE001 - e.g. a fallback never presented: the same in both replays
                        errors += 1
                continue
            d = engine.decide(DecideInput(s["customer_id"], s["channel"], touchpoint=s["touchpoint"],
                                          context=s["context"], max_actions=s["max_actions"], explain=True,
                                          interaction_id=s["interaction_id"]))
            decided[s["decide"]] = d
            rows.append({"step": s["decide"], "actions": [[a.action_id, round(a.propensity, 6)] for a in d.actions],
                         "degraded": d.degraded, "control": d.control, "repeat": d.repeat, "cold": d.cold_start,
                         "funnel": sorted([f.action_id, f.stage, f.detail] for f in d.funnel)})
        rules.current.close()
    Path(out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(rows)} decisions ({errors} responses refused) -> {out}")


def compare(a: str, b: str) -> int:
    left = [json.loads(line) for line in Path(a).read_text().splitlines()]
    right = [json.loads(line) for line in Path(b).read_text().splitlines()]
    differ = [(x, y) for x, y in zip(left, right) if x != y]
    shown = sum(len(x.get("actions", [])) for x in left)
    # replay's funnel rows are [action, stage, detail]; servicer's answers carry the proto's funnel messages
    limited = sum(isinstance(f, list) and f[1] == "contact" for x in left for f in x.get("funnel", []))
    print(f"{len(left)} and {len(right)} decisions ({shown} actions presented, {limited} stopped by a contact "
          f"policy); {len(differ)} differ")
    for x, y in differ[:5]:
        print(json.dumps(x), "\n", json.dumps(y), "\n")
    return 0 if not differ and len(left) == len(right) else 1


def servicer(tree: Path, calls: int, out: str, models_dir: str) -> None:
    """``calls`` Decides through ``tree``'s ``DecisionServicer``, one JSON line per answer (no decision id)."""
    sys.path.insert(0, str(tree))  # before the first engine import: the tree's code answers
    from types import SimpleNamespace

    from google.protobuf.json_format import MessageToDict
    from harness.clients import CallContext

    from engine.api.nba.v1 import nba_pb2 as pb
    from engine.decision.funnel import DecisionEngine
    from engine.live import Live
    from engine.models.registry import ModelRegistry
    from engine.rules.runtime import load_and_compile
    from engine.serving.server import DecisionServicer
    from engine.sim import demo
    from engine.sim.telco import SCHEMA
    from engine.store.decision_log import DecisionLog
    from engine.store.profiles import ProfileStore
    from engine.store.redis_embedded import EmbeddedRedis

    imported = Path(sys.modules["engine"].__file__ or "").resolve()
    if not imported.is_relative_to(tree):
        raise SystemExit(f"--tree {tree}: engine was imported from {imported.parent}, not from the tree")
    now = [1_781_524_800.0]  # noon UTC: no quiet hours at first
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(tmp, persist=False) as redis_server:
        store = ProfileStore.from_url(redis_server.url)
        demo.seed(store, 3000)
        rules = Live(load_and_compile(tree / "rules"), retire=lambda r: r.close())
        model = Live(ModelRegistry(models_dir, SCHEMA).load())
        engine = DecisionEngine(store, rules, model, DecisionLog(store.client), contacts=True, clock=lambda: now[0])
        engine.warmup()
        # all it uses of an App for Decide: the engine, and the rules (the declared channels; older trees ignore them)
        served = DecisionServicer(SimpleNamespace(engine=engine, rules=rules))  # type: ignore[arg-type]
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
                answer = MessageToDict(served.Decide(req, CallContext()))
                answer.pop("decisionId", None)
                f.write(json.dumps(answer, sort_keys=True) + "\n")
        rules.current.close()
    print(f"{calls} answers of {tree}'s servicer -> {out}")


def main(argv: list[str] | None = None) -> int:
    ap = common.parser(__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("record")
    r.add_argument("requests")
    r.add_argument("--requests", dest="steps", type=int, default=10_000)
    r.add_argument("--days", type=float, default=45)
    r.add_argument("--hot", type=int, default=50)
    r.add_argument("--seed", type=int, default=18)
    p = sub.add_parser("replay")
    p.add_argument("requests")
    p.add_argument("out")
    common.add_models_dir(p, ROOT / "models")
    p.add_argument("--cluster", action="store_true", help="on a local Redis Cluster (3 masters, 3 replicas)")
    p.add_argument("--budget", type=int, default=0, help="a daily budget of this many on every offer")
    v = sub.add_parser("servicer")
    v.add_argument("out")
    v.add_argument("--tree", type=Path, default=ROOT, help=f"the source tree whose servicer answers (default {ROOT})")
    v.add_argument("--calls", type=int, default=5000, help="Decides (default 5000)")
    common.add_models_dir(v, "/tmp/nba-models")
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    args = ap.parse_args(argv)
    if args.command == "record":
        record(args.requests, args.steps, args.days, args.hot, args.seed)
    elif args.command == "replay":
        replay(args.requests, args.out, args.models_dir, args.cluster, args.budget)
    elif args.command == "servicer":
        servicer(args.tree.resolve(), args.calls, args.out, args.models_dir)
    else:
        return compare(args.a, args.b)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
