"""Model registry, hot swap, champion/challenger, exploration and training from recorded traffic,
through a real gRPC server on a real port with a real Redis."""

from __future__ import annotations

import io
import json
import shutil
import threading
import time
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from engine.analytics.report import build_report
from engine.analytics.training_rows import from_streams
from engine.api.nba.v1 import nba_pb2 as pb
from engine.api.nba.v1 import nba_pb2_grpc as pb_grpc
from engine.cli import main as nba
from engine.config import Config
from engine.models.experiment import EXPERIMENT_FILE, ExperimentError, ModelSet, parse_experiment
from engine.models.exploration import COUNTS_KEY
from engine.models.model_input import model_input
from engine.models.registry import ModelRefused, ModelRegistry
from engine.models.training import read_csv
from engine.serving.app import App
from engine.serving.server import build_server
from engine.sim.telco import SCHEMA
from engine.sim.world import generate
from engine.store.profiles import DECISIONS_STREAM, Profile, ProfileStore, redis_client
from engine.store.streams import length, xrange_all

from .conftest import RULES_DIR, as_admin, local_auth

ROWS = model_input(SCHEMA)
CHANNEL_INDEX, FEATURES, customer_block = ROWS.channel_index, ROWS.features, ROWS.customer_block

DAY = 86_400


@dataclass
class Trained:
    text: str
    actions: list[str]


@pytest.fixture(scope="session")
def second_model() -> Trained:
    """Another small model on the demo catalog, to promote or run as a challenger."""
    from engine.rules.runtime import load_and_compile
    from engine.sim.training_data import train

    rules = load_and_compile(RULES_DIR)
    try:
        actions = rules.ruleset.actions
        booster, _, _ = train(generate(2_000, 8), actions, rounds=15)
        return Trained(booster.model_to_string(), [a.id for a in actions])
    finally:
        rules.close()


@pytest.fixture()
def live(redis_url: str, models_dir: Path, tmp_path: Path):
    """A server on its own copy of the registry, polling it every 50 ms: (app, channel, registry)."""
    shutil.copytree(models_dir, tmp_path / "models")
    shutil.copytree(RULES_DIR, tmp_path / "rules")
    app = App(Config(redis_url=redis_url, rules_dir=tmp_path / "rules", models_dir=tmp_path / "models",
                     demo_customers=1_000, metrics_port=0, model_poll_seconds=0.05)).start()
    server, port, health = build_server(app, "127.0.0.1:0", auth=local_auth())
    server.start()
    health.set("", health_pb2.HealthCheckResponse.SERVING)
    channel = as_admin(grpc.insecure_channel(f"127.0.0.1:{port}"))
    yield app, channel, app.registry
    channel.close()
    server.stop(0).wait()
    app.close()


def decide(channel: grpc.Channel, customer: str, ch: int = pb.CHANNEL_WEB) -> pb.DecideResponse:
    return pb_grpc.DecisionServiceStub(channel).Decide(pb.DecideRequest(customer_id=customer, channel=ch,
                                                                        max_actions=3), timeout=10)


def wait_for(condition, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def decision_records(url: str, n: int) -> list[dict]:
    client = redis_client(url, decode_responses=True)
    try:
        wait_for(lambda: length(client, DECISIONS_STREAM) >= n, what=f"{n} decision records")
        return [fields for _, fields in xrange_all(client, DECISIONS_STREAM)]
    finally:
        client.close()


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = nba(list(argv))
    return code, out.getvalue(), err.getvalue()


# --- registry ---------------------------------------------------------------------------------------

def test_schema_json_describes_every_feature(models_dir: Path) -> None:
    registry = ModelRegistry(models_dir, SCHEMA)
    schema = json.loads((registry.dir / registry.champion() / "schema.json").read_text())
    assert schema["features"] == list(FEATURES)
    assert len(schema["types"]) == len(FEATURES) and set(schema["types"]) == {"numeric", "binary", "categorical"}
    assert schema["levels"]["channel"][0] == "call_center" and "lifecycle_stage" in schema["levels"]
    assert len(schema["actions"]) >= 30
    metrics = registry.metrics(registry.champion())
    assert {"holdout_auc", "holdout_logloss", "by_action_type", "calibration"} <= set(metrics["metrics"])
    assert metrics["training"]["rows"] > 0


@pytest.mark.parametrize("change, expected", [
    (lambda s: s.__setitem__("features", ["tenure_years"] + s["features"][1:]), "tenure_years"),
    (lambda s: s.__setitem__("features", s["features"][:-1] + ["channel_code"]), "channel"),
    (lambda s: s.__setitem__("types", ["numeric"] * len(s["types"])), "types"),
    (lambda s: s.pop("types"), "older version"),
])
def test_a_model_whose_schema_differs_is_refused(tmp_path: Path, second_model: Trained, change, expected) -> None:
    registry = ModelRegistry(tmp_path, SCHEMA)
    version = registry.save(second_model.text, second_model.actions, {}, {})
    path = registry.dir / version / "schema.json"
    schema = json.loads(path.read_text())
    change(schema)
    path.write_text(json.dumps(schema))
    with pytest.raises(ModelRefused, match=expected):
        registry.load(version)
    code, _, err = run_cli("models", "--models-dir", str(tmp_path), "promote", version)
    assert code == 1 and "refused" in err and expected in err
    assert registry.champion() is None


def test_a_model_reads_categories_by_level_name(tmp_path: Path, second_model: Trained) -> None:
    """Levels in another order (a level added or removed in domain.yaml since training) are recoded by name."""
    registry = ModelRegistry(tmp_path, SCHEMA)
    version = registry.save(second_model.text, second_model.actions, {}, {})
    path = registry.dir / version / "schema.json"
    schema = json.loads(path.read_text())
    schema["levels"]["channel"] = list(reversed(schema["levels"]["channel"]))
    schema["levels"]["plan"] = schema["levels"]["plan"][:-1]  # a level the model never saw
    path.write_text(json.dumps(schema))
    model = registry.load(version)
    adapter = ROWS.adapter(model.features, model.levels)
    assert adapter is not None and ROWS.adapter(ROWS.features, ROWS.feature_levels()) is None
    x = ROWS.shared_row(ROWS.customer_block(Profile.cold("X", SCHEMA)), "web")
    plan = ROWS.features.index("plan")
    x[plan] = len(SCHEMA.categorical["plan"]) - 1  # "unlimited"
    seen = adapter(x)
    assert seen[CHANNEL_INDEX] == len(SCHEMA.channel_names) - 1 - SCHEMA.channel_names.index("web")
    assert np.isnan(seen[plan]) and np.array_equal(seen[:plan], x[:plan], equal_nan=True)


def test_models_list_show_promote(tmp_path: Path, models_dir: Path, second_model: Trained) -> None:
    shutil.copytree(models_dir, tmp_path / "m")
    registry = ModelRegistry(tmp_path / "m", SCHEMA)
    old = registry.champion()
    new = registry.save(second_model.text, second_model.actions, {"holdout_auc": 0.5}, {"rows": 7, "source": "test"})
    code, out, _ = run_cli("models", "--models-dir", str(tmp_path / "m"), "list")
    assert code == 0 and f"*  {old}" in out and f"   {new}  auc 0.5" in out
    code, out, _ = run_cli("models", "--models-dir", str(tmp_path / "m"), "show", old)
    assert code == 0 and "calibration" in out and "retention" in out
    code, out, _ = run_cli("models", "--models-dir", str(tmp_path / "m"), "promote", new)
    assert code == 0 and registry.champion() == new


# --- hot swap, challenger, shadow -------------------------------------------------------------------

def test_promote_while_decide_calls_run(live, second_model: Trained) -> None:
    """`nba models promote` reaches the running server: no call fails, later decisions carry it."""
    app, channel, registry = live
    old = app.model.current.version
    new = registry.save(second_model.text, second_model.actions, {}, {})
    seen: list[list[str]] = [[] for _ in range(4)]
    errors: list[BaseException] = []
    stop = threading.Event()

    def client(k: int) -> None:
        stub = pb_grpc.DecisionServiceStub(channel)
        i = 0
        while not stop.is_set():
            try:
                reply = stub.Decide(pb.DecideRequest(customer_id=f"C{(k * 250 + i) % 1000:07d}",
                                                     channel=pb.CHANNEL_CALL_CENTER), timeout=10)
                seen[k].append(reply.model_version)
            except grpc.RpcError as exc:
                errors.append(exc)
            i += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: all(len(s) >= 20 for s in seen), what="decisions before the promotion")
        code, out, _ = run_cli("models", "--models-dir", str(registry.dir.parent), "promote", new)
        assert code == 0, out
        wait_for(lambda: all(new in s for s in seen), what="decisions by the new model")
        counts = [len(s) for s in seen]
        wait_for(lambda: all(len(s) >= c + 20 for s, c in zip(seen, counts)), what="decisions after the swap")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
    for versions in seen:
        first_new = versions.index(new)
        assert set(versions[:first_new]) == {old}
        assert set(versions[first_new:]) == {new}  # once swapped, never back
    assert app.model.current.version == new and app.model_watcher.last_error is None


@pytest.mark.both_redis
def test_challenger_split_is_stable_by_customer_and_recorded(live, second_model: Trained, redis_url: str) -> None:
    app, channel, registry = live
    champion = app.model.current.version
    challenger = registry.save(second_model.text, second_model.actions, {}, {})
    (registry.dir / EXPERIMENT_FILE).write_text(
        f"challenger:\n  version: {challenger}\n  mode: split\n  share: 0.5\n")
    wait_for(lambda: app.model.current.challenger is not None, what="the challenger to go live")
    status = pb_grpc.AdminServiceStub(channel).GetStatus(pb.GetStatusRequest(), timeout=5)
    assert (status.model_version, status.experiment_mode, status.challenger_version, status.challenger_share) == (
        champion, "split", challenger, 0.5)
    customers = [f"C{i:07d}" for i in range(0, 1000, 5)]
    first = {c: decide(channel, c).model_version for c in customers}
    again = {c: decide(channel, c, pb.CHANNEL_MOBILE_APP).model_version for c in customers}
    assert first == again  # stable by customer id hash, whatever the channel
    share = sum(v == challenger for v in first.values()) / len(first)
    assert set(first.values()) == {champion, challenger} and 0.35 < share < 0.65
    records = decision_records(redis_url, 2 * len(customers))
    roles = {(r["model_version"], r["model_role"]) for r in records}
    assert roles == {(champion, "champion"), (challenger, "challenger")}


@pytest.mark.both_redis
def test_shadow_challenger_is_scored_and_logged_but_never_decides(live, second_model: Trained, redis_url: str) -> None:
    app, channel, registry = live
    champion = app.model.current.version
    shadow = registry.save(second_model.text, second_model.actions, {}, {})
    (registry.dir / EXPERIMENT_FILE).write_text(f"challenger:\n  version: {shadow}\n  mode: shadow\n")
    wait_for(lambda: app.model.current.mode == "shadow", what="the shadow model")
    replies = [decide(channel, f"C{i:07d}") for i in range(40)]
    assert {r.model_version for r in replies} == {champion}
    records = [r for r in decision_records(redis_url, 40) if r["actions"]]
    assert records and all(r["shadow_model"] == shadow for r in records)
    for r in records:
        scores = [float(p) for p in r["shadow_propensities"].split(",")]
        assert len(scores) == len(r["actions"].split(",")) and all(0 <= p <= 1 for p in scores)
        assert r["shadow_top"]
    # the shadow scores differ from the champion's (another model), so they were really computed
    assert any(r["shadow_propensities"] != r["propensities"] for r in records)


def test_a_bad_experiment_file_or_model_is_refused_and_the_live_set_stays(live) -> None:
    app, _, registry = live
    before = app.model.current
    (registry.dir / EXPERIMENT_FILE).write_text("challenger:\n  version: v1\n  mode: sideways\n")
    wait_for(lambda: app.model_watcher.last_error, what="the refusal")
    assert "challenger.mode" in app.model_watcher.last_error and app.model.current is before
    (registry.dir / EXPERIMENT_FILE).write_text("challenger:\n  version: v-does-not-exist\n")
    wait_for(lambda: "v-does-not-exist" in (app.model_watcher.last_error or ""), what="the refusal")
    assert app.model.current is before


@pytest.mark.parametrize("text, key", [
    ("challenger: {version: v1, share: 2}", "challenger.share"),
    ("challenger: {mode: split}", "challenger.version"),
    ("exploration: {strategy: greedy}", "exploration.strategy"),
    ("exploration: {strategy: thompson, weight: -1}", "exploration.weight"),
    ("exploration: {strategy: thompson, control: maybe}", "exploration.control"),
    ("explorations: {}", "unknown key"),
])
def test_experiment_errors_name_the_key(text: str, key: str) -> None:
    with pytest.raises(ExperimentError, match=key):
        parse_experiment(text)


# --- exploration ------------------------------------------------------------------------------------

@pytest.mark.both_redis
def test_thompson_exploration_is_stable_skips_the_control_group_and_learns_from_responses(live, redis_url: str) -> None:
    app, channel, registry = live
    (registry.dir / EXPERIMENT_FILE).write_text(
        "exploration:\n  strategy: thompson\n  share: 1.0\n  weight: 0.9\n  prior_strength: 2\n")
    wait_for(lambda: app.model.current.exploration.enabled, what="exploration to go live")
    status = pb_grpc.AdminServiceStub(channel).GetStatus(pb.GetStatusRequest(), timeout=5)
    assert (status.exploration_strategy, status.exploration_share, status.experiment_mode) == ("thompson", 1.0, "none")
    control = app.rules.current.ruleset.contact.control
    customers = [f"C{i:07d}" for i in range(120)]
    replies = {c: decide(channel, c) for c in customers}
    in_control = {c for c in customers if control.contains(c)}
    assert in_control and len(in_control) < len(customers)
    records = {r["customer_id"]: r for r in decision_records(redis_url, len(customers))}
    for c, reply in replies.items():
        explored = records[c]["explored"] == "1"
        scored = any(a.propensity > 0 for a in reply.actions)  # not a fallback: the model ranked something
        assert explored == (c not in in_control and scored), c
        assert all(("exploring" in " ".join(a.reasons)) == explored for a in reply.actions)
    assert sum(r["explored"] == "1" for r in records.values()) > len(customers) / 2
    report = build_report(redis_client(redis_url))  # nba report states the share
    assert report["exploration"]["decisions"] == sum(r["explored"] == "1" for r in records.values())
    assert report["exploration"]["share"] == pytest.approx(report["exploration"]["decisions"] / report["decisions"])
    assert sum(m["decisions"] for m in report["models"].values()) == report["decisions"]
    # same customer, same period, same state: the same answer (one voice)
    # (a customer who accepts nothing below: an acceptance changes what comes next, no_offer_after_acceptance)
    explorer = next(c for c in customers[30:] if records[c]["explored"] == "1")
    assert [a.action_id for a in decide(channel, explorer).actions] == [a.action_id for a in replies[explorer].actions]
    # responses reach the posterior: counted once, from the streams, by the consumer group
    stub = pb_grpc.DecisionServiceStub(channel)
    accepted = 0
    for c in customers[:30]:
        if replies[c].actions:
            stub.RecordResponse(pb.RecordResponseRequest(decision_id=replies[c].decision_id,
                                                         action_id=replies[c].actions[0].action_id,
                                                         outcome=pb.OUTCOME_ACCEPTED), timeout=5)
            accepted += 1
    presented = sum(len(r.actions) for r in replies.values())
    client = redis_client(redis_url, decode_responses=True)
    try:
        def totals() -> tuple[int, int]:
            counts = client.hgetall(COUNTS_KEY)
            return (sum(int(v) for k, v in counts.items() if k.endswith("|shown")),
                    sum(int(v) for k, v in counts.items() if k.endswith("|accepted")))
        wait_for(lambda: totals()[1] == accepted and totals()[0] >= presented, what="exploration counts")
    finally:
        client.close()
    wait_for(lambda: sum(a for _, a in app.exploration.counts.values()) == accepted, what="the live counts")
    # The posterior is pinned for the period (one voice); the next period's posterior has learned.
    config = app.model.current.exploration
    actions = tuple(a.id for a in app.rules.current.ruleset.actions)
    now = time.time()
    alpha_now, beta_now = app.engine.explorer.posterior(config, actions, now)
    alpha_next, beta_next = app.engine.explorer.posterior(config, actions, now + config.period_hours * 3600)
    prior = config.prior_mean * config.prior_strength
    assert (alpha_now == prior).all()
    assert alpha_next.sum() - prior * len(actions) == pytest.approx(accepted)
    assert (alpha_next + beta_next).sum() - config.prior_strength * len(actions) >= presented
    assert [a.action_id for a in decide(channel, explorer).actions] == [a.action_id for a in replies[explorer].actions]
    from engine import metrics

    explored = sum(s.value for m in metrics.EXPLORATION.collect() for s in m.samples if s.name.endswith("_total"))
    assert explored >= len(customers) - len(in_control)


# --- training from recorded decisions and responses -------------------------------------------------

@pytest.mark.both_redis
def test_training_rows_are_the_model_input_at_decision_time(live, redis_url: str, tmp_path: Path) -> None:
    app, channel, registry = live
    world = generate(1_000, 7)  # what the service seeded
    stub = pb_grpc.DecisionServiceStub(channel)
    rng = np.random.default_rng(0)
    expected: dict[tuple[str, str], float | None] = {}
    decided_for: dict[str, str] = {}
    channels = [pb.CHANNEL_WEB, pb.CHANNEL_CALL_CENTER, pb.CHANNEL_MOBILE_APP]
    for i in range(240):
        reply = decide(channel, f"C{i % 600:07d}", channels[i % 3])
        decided_for[reply.decision_id] = f"C{i % 600:07d}"
        for a in reply.actions:
            u = rng.random()
            outcome = pb.OUTCOME_ACCEPTED if u < 0.3 else pb.OUTCOME_REJECTED if u < 0.55 else None
            if u > 0.85:
                outcome = pb.OUTCOME_CLICKED  # a click alone is no acceptance
            expected[(reply.decision_id, a.action_id)] = (
                1.0 if outcome == pb.OUTCOME_ACCEPTED else 0.0 if outcome == pb.OUTCOME_REJECTED else None)
            if outcome is not None:
                stub.RecordResponse(pb.RecordResponseRequest(decision_id=reply.decision_id, action_id=a.action_id,
                                                             outcome=outcome), timeout=5)
    decision_records(redis_url, 240)
    # The profile changes after the decisions: training must still see it as it was.
    store = ProfileStore.from_url(redis_url)
    changed = world.profile(5)
    changed.numeric = changed.numeric.copy()
    changed.numeric[:] = 123.0
    store.save([changed], SCHEMA)
    store.client.close()

    catalog = [a.id for a in app.rules.current.ruleset.actions]
    client = redis_client(redis_url)
    try:
        open_window = from_streams(client, SCHEMA, catalog, window_days=7, as_of=time.time())
        closed = from_streams(client, SCHEMA, catalog, window_days=7, as_of=time.time() + 8 * DAY)
    finally:
        client.close()
    final = {k: v for k, v in expected.items() if v is not None}
    assert len(open_window) == len(final) and open_window.summary["pending"] == len(expected) - len(final)
    assert len(closed) == len(expected) and closed.summary["pending"] == 0
    ids = closed.action_ids()
    for row in range(len(closed)):
        key = (closed.decision_ids[row], ids[row])
        assert closed.y[row] == (expected[key] or 0.0)  # no acceptance once the window closed: negative
        customer = int(decided_for[key[0]][1:])
        want = customer_block(world.profile(customer)).astype(np.float32).astype(np.float64)
        np.testing.assert_array_equal(closed.x[row, : len(want)], want)  # as at decision time
        action = next(a for a in app.rules.current.ruleset.actions if a.id == ids[row])
        assert closed.actions[int(closed.x[row, FEATURES.index("action")])] == action.id
        assert closed.x[row, FEATURES.index("action_value")] == action.value
        assert closed.x[row, CHANNEL_INDEX] in (0.0, 1.0, 2.0)
    assert closed.y.sum() > 10

    # The same through the command: export, train, compare with the champion on the same holdout.
    export = tmp_path / "rows.csv.gz"
    code, out, err = run_cli("train", "--from-stream", "--redis-url", redis_url, "--models-dir", str(registry.dir.parent),
                             "--rules-dir", str(app.config.rules_dir), "--as-of", str(time.time() + 8 * DAY),
                             "--rounds", "20", "--export", str(export), "--no-promote")
    assert code == 0, err
    assert f"exported {len(closed)} rows" in out and "champion on same holdout" in out and "calibration" in out
    assert export.stat().st_mode & 0o777 == 0o600  # customers' data: owner only, whatever the umask
    back = read_csv(export, SCHEMA, catalog)
    np.testing.assert_array_equal(back.x, closed.x)
    np.testing.assert_array_equal(back.y, closed.y)
    version = out.split("model ", 1)[1].split()[0]
    saved = registry.metrics(version)
    assert saved["training"]["source"] == "recorded decisions and responses"
    assert saved["metrics"]["champion"]["version"] == app.model.current.version
    assert set(saved["metrics"]["calibration"]) >= {"all"}


def test_service_propensities_equal_booster_predict(live) -> None:
    """The decision-shaped scorer the service uses agrees with LightGBM on the assembled rows."""
    import lightgbm as lgb


    app, channel, registry = live
    models: ModelSet = app.model.current
    booster = lgb.Booster(model_file=str(registry.dir / models.version / "model.txt"))
    rules = app.rules.current
    table = ROWS.action_table(rules.ruleset.actions, models.champion.action_levels)
    world = generate(1_000, 7)
    for i in (3, 17, 404):
        profile = world.profile(i)
        for ch in ("web", "call_center", "email"):
            x = ROWS.shared_row(customer_block(profile), ch)
            idx = np.arange(len(table.action_ids))
            got = app.engine._scorer(rules, models.champion)[0].predict(x, idx)
            want = booster.predict(ROWS.assemble(customer_block(profile), table, idx, ch), num_threads=1)
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
