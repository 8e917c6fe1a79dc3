"""The analytics wing aggregates recorded traffic in DuckDB (engine/analytics/recorded.py): its figures equal
the entry-by-entry Python computation they replaced (kept here, as it was, as the reference) on a recorded
dataset with every irregularity the streams allow, from the streams alone and from the archive plus the
tail; and after the streams are trimmed to nothing, `nba report`, `nba campaign report` and
`nba train --from-stream` still see every decision and response."""

from __future__ import annotations

import base64
import json
import random
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import pytest
import redis

from engine import cli
from engine.analytics.campaign_plan import rejection_share, traffic_from_stream
from engine.analytics.campaign_report import build_campaign_report
from engine.analytics.recorded import RangeError, Recorded, stream_bound
from engine.analytics.report import Tally, build_report, lift_from_totals, lift_interval
from engine.analytics.training_rows import from_streams
from engine.models.model_input import model_input
from engine.models.training import FINAL_NEGATIVE, POSITIVE
from engine.rules.campaigns import Campaign
from engine.sim.telco import SCHEMA
from engine.store.archive import ArchiveWriter, read_entries
from engine.store.profiles import DECISIONS_STREAM, RESPONSES_STREAM, profile_key, redis_client
from engine.store.slots import customer_shard_key, shard_keys
from engine.store.streams import xrange_all

from .clock import DAY, at

pytestmark = pytest.mark.both_redis

ACTIONS = ["a1", "a2", "a3", "a4", "a5", "b1", "b2", "new_one"]
CATALOG_TYPES = {"a1": "upsell", "a2": "upsell", "a3": "bundle", "a4": "retention", "a5": "service", "b1": "upsell"}
CATALOG_VALUES = {"a1": 10.0, "a2": 25.5, "a3": 40.0, "a4": 0.0, "b1": 7.25}
NAME = "spring"
START = at(2, "00:00")


# --- the reference: the Python computations the SQL replaced ---------------------------------------------

def _entries(client: Any, stream: str, since: str, archive: Path | None) -> Any:
    entries = xrange_all(client, stream, since) if archive is None else read_entries(client, stream, since, archive)
    for _, fields in entries:
        yield {k.decode(): v.decode() for k, v in fields.items()}


def python_report(client: Any, since: str = "-", customer_prefix: str = "", values: dict | None = None,
                  types: dict | None = None, bootstrap: int = 0, seed: int = 0, archive: Path | None = None) -> dict:
    values, types = values or {}, types or {}
    decisions: dict[str, tuple] = {}
    models: dict[str, dict[str, int]] = {}
    for d in _entries(client, DECISIONS_STREAM, since, archive):
        if customer_prefix and not d.get("customer_id", "").startswith(customer_prefix):
            continue
        actions = [a for a in d.get("actions", "").split(",") if a]
        kinds = d.get("types", "").split(",") if d.get("types") else [types.get(a, "?") for a in actions]
        vals = [float(x) for x in d["values"].split(",")] if d.get("values") else [values.get(a, 0.0) for a in actions]
        customer = d.get("customer_id") or f"decision:{d['decision_id']}"
        decisions[d["decision_id"]] = (actions, kinds, vals, d.get("control") == "1", customer)
        model = models.setdefault(f"{d.get('model_version', '?')} ({d.get('model_role') or 'champion'})",
                                  {"decisions": 0, "explored": 0})
        model["decisions"] += 1
        model["explored"] += d.get("explored") == "1"
    accepted: set[tuple[str, str]] = set()
    for r in _entries(client, RESPONSES_STREAM, since, archive):
        if r.get("outcome") == "accepted" and r.get("decision_id") in decisions:
            accepted.add((r["decision_id"], r["action_id"]))
    by_action: dict[str, Tally] = {}
    by_type: dict[str, Tally] = {}
    arms: dict[str, tuple[list, list, Tally]] = {"decision_policy": ([], [], Tally()), "control": ([], [], Tally())}
    for decision_id, (actions, kinds, vals, is_control, customer) in decisions.items():
        arm = arms["control" if is_control else "decision_policy"]
        total = 0.0
        for action_id, kind, value in zip(actions, kinds, vals):
            hit = (decision_id, action_id) in accepted
            for tally in (by_action.setdefault(action_id, Tally()), by_type.setdefault(kind, Tally()), arm[2]):
                tally.presented += 1
                tally.accepted += hit
                tally.value += value if hit else 0.0
            total += value if hit else 0.0
        arm[0].append(total)
        arm[1].append(customer)

    def summary(arm: tuple) -> dict:
        v = np.asarray(arm[0], dtype=float)
        return arm[2].row() | {"decisions": len(v),
                               "value_per_1000_decisions": round(1000 * float(v.mean()), 1) if len(v) else 0.0}

    (tv, tc, _), (cv, cc, _) = arms["decision_policy"], arms["control"]
    lift = lift_interval(np.asarray(tv), np.asarray(cv), np.asarray(tc), np.asarray(cc), bootstrap=bootstrap, seed=seed)
    return {
        "since": since, "decisions": len(decisions), "responses_accepted": len(accepted),
        "by_action": {a: t.row() for a, t in sorted(by_action.items(), key=lambda kv: -kv[1].value)},
        "by_type": {k: t.row() for k, t in sorted(by_type.items(), key=lambda kv: -kv[1].value)},
        "policy": {name: summary(arm) for name, arm in arms.items()},
        "lift": lift, "models": models,
        "exploration": {"decisions": (explored := sum(m["explored"] for m in models.values())),
                        "share": explored / len(decisions) if decisions else 0.0},
    }


def python_campaign_figures(client: Any, campaign: Campaign, archive: Path | None) -> dict:
    name = campaign.name
    shown: list[tuple] = []
    first_in_play: dict[str, float] = {}
    arm: dict[str, str] = {}
    customer_of: dict[str, str] = {}
    decided_at: dict[str, float] = {}
    for d in _entries(client, DECISIONS_STREAM, "-", archive):
        did, cid, ts = d.get("decision_id", ""), d.get("customer_id", ""), float(d.get("ts") or 0)
        customer_of[did], decided_at[did] = cid, ts
        for field_, side in (("campaign_eligible", "treated"), ("campaign_control", "control")):
            if name in (d.get(field_) or "").split(","):
                arm.setdefault(cid, side)
                first_in_play[cid] = min(first_in_play.get(cid, ts), ts)
        tags = (d.get("campaigns") or "").split(",")
        if name not in tags:
            continue
        actions, values = d.get("actions", "").split(","), d.get("values", "").split(",")
        for i, tag in enumerate(tags):
            if tag == name and i < len(actions):
                shown.append((did, cid, d.get("channel", ""), actions[i],
                              float(values[i]) if i < len(values) and values[i] else 0.0, ts))
    accepted: dict[tuple[str, str], tuple[float, str]] = {}
    for r in _entries(client, RESPONSES_STREAM, "-", archive):
        if r.get("outcome") == "accepted":
            accepted.setdefault((r.get("decision_id", ""), r.get("action_id", "")),
                                (float(r.get("value") or 0), r.get("action_type", "")))
    segment = {cid: (client.hget(profile_key(cid), "segment") or b"unknown").decode()
               for cid in {s[1] for s in shown} | set(arm)}
    total, tz = Tally(), ZoneInfo(campaign.time_zone)
    by: dict[str, dict[str, Tally]] = {k: defaultdict(Tally) for k in ("by_channel", "by_segment", "by_action")}
    per_day: dict[str, int] = defaultdict(int)
    for did, cid, channel, action, value, ts in shown:
        hit = (did, action) in accepted
        for tally in (total, by["by_channel"][channel], by["by_segment"][segment[cid]], by["by_action"][action]):
            tally.presented += 1
            tally.accepted += hit
            tally.value += value if hit else 0.0
        per_day[datetime.fromtimestamp(ts, tz).strftime("%Y-%m-%d")] += 1
    outcome: dict[str, float] = defaultdict(float)
    for (did, _action), (value, _kind) in accepted.items():
        cid = customer_of.get(did)
        if cid in arm and first_in_play[cid] <= decided_at[did] < campaign.end:
            outcome[cid] += value  # objective "value"
    arms = {side: sorted(c for c, a in arm.items() if a == side) for side in ("treated", "control")}
    totals = {side: (np.array([outcome[c] for c in ids], dtype=float), np.ones(len(ids))) for side, ids in arms.items()}
    lift = lift_from_totals(totals["treated"], totals["control"])
    return {"totals": total.row() | {"customers": len({s[1] for s in shown})},
            **{k: {name: t.row() for name, t in sorted(v.items())} for k, v in by.items()},
            "lift": {k: lift.get(k) for k in ("lift", "ci95", "ratio", "note")},
            "per_day": dict(sorted(per_day.items())), "as_of": max((s[5] for s in shown), default=campaign.start)}


def python_training_rows(client: Any, catalog: list[str], as_of: float, archive: Path | None,
                         campaigns: tuple[str, ...] = ()) -> tuple:
    """The label, time, decision, action and customer block of each row, as the Python from_streams made them."""
    layout = model_input(SCHEMA)
    window = 7 * 86400.0
    outcomes: dict[tuple[str, str], list[tuple[str, float]]] = {}
    for r in _entries(client, RESPONSES_STREAM, "-", archive):
        outcomes.setdefault((r.get("decision_id", ""), r.get("action_id", "")), []).append(
            (r.get("outcome", ""), float(r.get("ts") or 0)))
    levels = list(catalog)
    rows, counts = [], {"pending": 0, "other_campaigns": 0, "without_features": 0, "other_schema": 0}
    for d in _entries(client, DECISIONS_STREAM, "-", archive):
        if not d.get("actions"):
            continue
        if not d.get("features"):
            counts["without_features"] += 1
            continue
        if d.get("feature_schema") != SCHEMA.fingerprint():
            counts["other_schema"] += 1  # no older layouts are registered in this test
            continue
        ts = float(d.get("ts") or 0)
        tags = d.get("campaigns", "").split(",")
        for i, action in enumerate(d["actions"].split(",")):
            campaign = (tags[i] if i < len(tags) else "") or "-"
            if campaigns and campaign not in campaigns:
                counts["other_campaigns"] += 1
                continue
            seen = outcomes.get((d.get("decision_id", ""), action), [])
            if any(o in POSITIVE and r_ts - ts <= window for o, r_ts in seen):
                label = 1.0
            elif any(o in FINAL_NEGATIVE for o, _ in seen) or ts + window <= as_of:
                label = 0.0
            else:
                counts["pending"] += 1
                continue
            if action not in levels:
                levels.append(action)
            rows.append((label, ts, d.get("decision_id", ""), levels.index(action),
                         tuple(layout.decode_features(d["features"]).tolist())))
    return rows, levels, counts


# --- a recorded dataset with every irregularity ----------------------------------------------------------

def features(rng: random.Random) -> str:
    width = len(model_input(SCHEMA).customer_features)
    return base64.b64encode(np.array([rng.random() for _ in range(width)], dtype="<f4").tobytes()).decode()


def record(client: redis.Redis, n: int, seed: int, start: int = 0) -> list[str]:
    """``n`` decisions (from number ``start``) and responses to many of them, on every shard; their ids."""
    rng = random.Random(seed)
    pipe = client.pipeline(transaction=False)
    ids = []
    last: dict[str, tuple[int, int]] = {}

    def add(base: str, customer: str, fields: dict[str, str], ms: int) -> None:
        key = customer_shard_key(base, customer, client)  # type: ignore[arg-type]
        prev = last.get(key, (0, -1))
        last[key] = (ms, prev[1] + 1) if ms == prev[0] else (max(ms, prev[0]), 0 if ms > prev[0] else prev[1] + 1)
        pipe.xadd(key, fields, id=f"{last[key][0]}-{last[key][1]}")  # type: ignore[arg-type]

    for i in range(start, start + n):
        cid = rng.choice([f"C{rng.randrange(45):03d}", f"K{rng.randrange(9)}", "", None])
        did = f"d{i}" if rng.random() > 0.03 else f"d{max(start, i - 5)}"  # a decision id recorded twice
        actions = rng.sample(ACTIONS, rng.randint(0, 3))
        if rng.random() < 0.05 and len(actions) > 1:
            actions.insert(1, "")  # an empty action between two: "a1,,a2"
        fields: dict[str, str] = {"decision_id": did, "actions": ",".join(actions), "channel": rng.choice(["web", "app", "sms"]),
                                  "ts": f"{START + i * 600 + rng.random():.3f}", "control": "1" if rng.random() < 0.2 else "0"}
        if cid is not None:
            fields["customer_id"] = cid
        if rng.random() < 0.7:
            fields["types"] = ",".join(CATALOG_TYPES.get(a, "?") for a in actions)
        if rng.random() < 0.7:
            fields["values"] = ",".join(f"{CATALOG_VALUES.get(a, 3.0) + rng.choice([0, 0.5, 1.25]):g}" for a in actions)
        if rng.random() < 0.9:
            fields["model_version"] = rng.choice(["m-1", "m-2", ""])
        if rng.random() < 0.5:
            fields["model_role"] = rng.choice(["champion", "challenger", ""])
        fields["explored"] = "1" if rng.random() < 0.1 else "0"
        tags = [rng.choice([NAME, "", "other"]) for _ in actions]
        fields["campaigns"] = ",".join(tags)
        if rng.random() < 0.4:
            fields["campaign_eligible"] = rng.choice([NAME, f"other,{NAME}", "other"])
        elif rng.random() < 0.2:
            fields["campaign_control"] = NAME
        if rng.random() < 0.9:
            fields["features"] = features(rng)
            fields["feature_schema"] = SCHEMA.fingerprint() if rng.random() < 0.95 else "unknown-layout"
        key_customer = cid or did
        ms = int((START + i * 600) * 1000)  # entry ids on the test calendar: the decisions' own days
        add(DECISIONS_STREAM, key_customer, fields, ms)
        ids.append(did)
        for action in actions:
            roll = rng.random()
            if roll < 0.25:
                outcome = "accepted"
            elif roll < 0.4:
                outcome = rng.choice(["rejected", "ignored", "clicked", "impression"])
            else:
                continue
            response = {"decision_id": did, "action_id": action, "outcome": outcome,
                        "value": f"{CATALOG_VALUES.get(action, 1.0) * 2:g}", "action_type": CATALOG_TYPES.get(action, ""),
                        "ts": f"{START + i * 600 + rng.choice([60, 3 * DAY, 8 * DAY]):.3f}"}
            for _ in range(2 if rng.random() < 0.1 else 1):  # an acceptance recorded twice
                add(RESPONSES_STREAM, key_customer, response, ms + 1)
        if rng.random() < 0.05:  # responses to a decision never recorded, and to an action not presented
            for ghost in ({"decision_id": f"ghost{i}", "action_id": "a1", "outcome": "accepted", "ts": "0"},
                          {"decision_id": did, "action_id": "b2", "outcome": "accepted", "ts": "0"}):
                add(RESPONSES_STREAM, key_customer, ghost, ms + 2)
    for k in range(45):
        if k % 4:
            pipe.hset(profile_key(f"C{k:03d}"), "segment", ("consumer", "family", "business")[k % 3])
    pipe.execute()
    return ids


def campaign() -> Campaign:
    return Campaign(NAME, "value", "tests@example.com", START + 3600, START + 200 * 600, "Europe/Berlin",
                    ("a1", "a2"), total_budget=500)


def sql_campaign_figures(report: dict) -> dict:
    return {"totals": report["totals"], "by_channel": report["by_channel"], "by_segment": report["by_segment"],
            "by_action": report["by_action"], "lift": {k: report["lift"].get(k) for k in ("lift", "ci95", "ratio", "note")},
            "per_day": {s["day"]: s["presented"] for s in report["spend"] if s["presented"]},
            "as_of": report["pacing"]["as_of"]}


def same(a: dict, b: dict) -> None:
    assert json.dumps(a) == json.dumps(b)  # the same figures, in the same order


def check_all(client: redis.Redis, archive: Path | None) -> None:
    kwargs: dict = {"values": CATALOG_VALUES, "types": CATALOG_TYPES}
    same(build_report(client, archive=archive, **kwargs), python_report(client, archive=archive, **kwargs))
    same(build_report(client, archive=archive, customer_prefix="C0", bootstrap=300, seed=4, **kwargs),
         python_report(client, archive=archive, customer_prefix="C0", bootstrap=300, seed=4, **kwargs))
    since = f"{int((START + 250 * 600) * 1000)}"  # from the middle on
    same(build_report(client, since=since, archive=archive), python_report(client, since=since, archive=archive))
    same(sql_campaign_figures(build_campaign_report(client, campaign(), archive=archive)),
         python_campaign_figures(client, campaign(), archive))
    catalog = ["a1", "a2", "a3"]
    as_of = START + 60 * DAY
    for only in ((), (NAME, "-")):
        data = from_streams(client, SCHEMA, catalog, as_of=START + 200 * 600, archive=archive, campaigns=only)
        data_closed = from_streams(client, SCHEMA, catalog, as_of=as_of, archive=archive, campaigns=only)
        for got, when in ((data, START + 200 * 600), (data_closed, as_of)):
            rows, levels, counts = python_training_rows(client, catalog, when, archive, only)
            assert got.actions == levels
            assert {k: got.summary[k] for k in counts} == counts
            assert got.y.tolist() == [r[0] for r in rows] and got.t.tolist() == [r[1] for r in rows]
            assert got.decision_ids == [r[2] for r in rows]
            assert got.x[:, got.rows.row_features[0]].tolist() == [float(r[3]) for r in rows]
            width = len(got.rows.customer_features)
            assert got.x[:, :width].tolist() == [list(r[4]) for r in rows]
        assert data_closed.summary["pending"] == 0 and len(data_closed) > len(data) > 100


def _trim_to_nothing(redis_admin_url: str) -> None:
    """XTRIM MAXLEN 0 on every shard of the decision and response streams, as the admin."""
    admin = redis_client(redis_admin_url)
    for base in (DECISIONS_STREAM, RESPONSES_STREAM):
        for key in shard_keys(base, admin):
            admin.xtrim(key, maxlen=0, approximate=False)
    admin.close()


def test_the_sql_figures_equal_the_python_ones_from_the_streams_and_from_the_archive(redis_url: str,
                                                                                   tmp_path: Path) -> None:
    client = redis_client(redis_url)
    record(client, 500, seed=1)
    check_all(client, None)  # the streams alone
    root = tmp_path / "archive"
    with ArchiveWriter(client, root, file_entries=60) as writer:  # several files per shard and day
        assert writer.once() > 0
    record(client, 150, seed=2, start=500)  # a tail not archived yet
    check_all(client, root)
    report = build_report(client, archive=root)
    assert report["decisions"] > 500 and report["responses_accepted"] > 50 and len(report["models"]) >= 4
    assert report["lift"]["lift"] is not None and "?" in report["by_type"]


def test_traffic_and_rejections_for_the_plan_read_the_archive(redis_url: str, redis_admin_url: str,
                                                              tmp_path: Path) -> None:
    client = redis_client(redis_url)
    record(client, 300, seed=3)
    traffic = traffic_from_stream(client, 60, 1.0, ["web", "app", "sms", "email"])
    share = rejection_share(client, 1.0)
    assert traffic.recorded is not None and sum(traffic.recorded.values()) > 100 and traffic.recorded["email"] == 0
    assert 0 < share < 1 and traffic.per_day > 1 and traffic.presented and "" not in traffic.presented
    root = tmp_path / "archive"
    with ArchiveWriter(client, root, file_entries=40) as writer:
        writer.once()
    _trim_to_nothing(redis_admin_url)
    assert traffic_from_stream(client, 60, 1.0, ["web"]).recorded == {}  # the streams alone: nothing left
    again = traffic_from_stream(client, 60, 1.0, ["web", "app", "sms", "email"], archive=root)
    assert again.channels == traffic.channels and again.recorded == traffic.recorded
    assert again.customers is not None and traffic.customers is not None
    assert again.customers.tolist() == traffic.customers.tolist() and again.per_day == traffic.per_day
    assert again.presented == traffic.presented and again.covered == traffic.covered
    assert rejection_share(client, 1.0, archive=root) == share


def test_reports_and_training_see_everything_after_the_streams_are_trimmed_to_nothing(
        redis_url: str, redis_admin_url: str, tmp_path: Path, models_dir: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from .test_campaigns import blitz, rules_with

    client = redis_client(redis_url)
    record(client, 400, seed=5)
    decisions = sum(1 for _ in xrange_all(client, DECISIONS_STREAM))
    responses = sum(1 for _ in xrange_all(client, RESPONSES_STREAM))
    rules = rules_with(tmp_path, blitz())
    common = ["--redis-url", redis_url, "--rules-dir", str(rules), "--models-dir", str(tmp_path / "models")]
    before = build_report(client)
    root = tmp_path / "archive"
    with ArchiveWriter(client, root, file_entries=70) as writer:
        writer.once()
    _trim_to_nothing(redis_admin_url)
    assert sum(1 for _ in xrange_all(client, DECISIONS_STREAM)) == 0

    assert cli.main(["report", *common, "--archive", str(root), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads(json.dumps(before))  # every decision and acceptance, the same figures
    with Recorded(client, root) as rec:  # every entry is there to read
        rec.view(DECISIONS_STREAM, ())
        rec.view(RESPONSES_STREAM, ())
        assert rec.sql("SELECT count(*) FROM decisions").fetchone()[0] == decisions
        assert rec.sql("SELECT count(*) FROM responses").fetchone()[0] == responses

    assert cli.main(["campaign", "report", "test_blitz", *common, "--archive", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["campaign"] == "test_blitz"
    spring = build_campaign_report(client, campaign(), archive=root)
    assert spring["totals"]["presented"] > 50
    same(sql_campaign_figures(spring), python_campaign_figures(client, campaign(), root))

    as_of = START + 60 * DAY
    rows, _, counts = python_training_rows(client, [], as_of, root)
    for flag in ("--from-stream", "--from-recorded"):
        assert cli.main(["train", *common, flag, "--archive", str(root), "--as-of", str(as_of),
                         "--export-only", "--export", str(tmp_path / "rows.csv")]) == 0
        printed = capsys.readouterr().out
        assert f"decisions {decisions}," in printed and f"responses {responses}," in printed
        assert f"; {len(rows)} labelled rows" in printed and f"pending {counts['pending']}" in printed
    # a date range: the decisions recorded on the second day (entry ids are on the test calendar: 144 a day)
    second_day = datetime.fromtimestamp(START + DAY, ZoneInfo("UTC")).strftime("%Y-%m-%d")
    one_day = build_report(client, archive=root, since=second_day, until=second_day)
    assert one_day["until"] == second_day
    assert one_day["decisions"] == python_report(client, since=f"{int((START + DAY) * 1000)}", archive=root)[
        "decisions"] - python_report(client, since=f"{int((START + 2 * DAY) * 1000)}", archive=root)["decisions"]
    assert 100 < one_day["decisions"] <= 144
    assert cli.main(["report", *common, "--archive", str(root), "--since", "yesterday"]) == 1
    assert "--since 'yesterday'" in capsys.readouterr().err


def test_stream_bounds_take_days_and_ids() -> None:
    assert stream_bound("-", True) == "-" and stream_bound("+", False) == "+" and stream_bound("", False) == "+"
    assert stream_bound("1700000000000-3", True) == "1700000000000-3"
    assert stream_bound("2026-01-02", True) == "1767312000000"
    assert stream_bound("2026-01-02", False) == str(1767312000000 + 86_400_000 - 1)
    for bad in ("2026-13-40", "last week", "12-ab"):
        with pytest.raises(RangeError, match="--since"):
            stream_bound(bad, True)
