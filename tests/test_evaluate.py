"""``nba evaluate`` end to end on decisions the real funnel logged: customers answer by a fixed law (accept
action a when a hash of customer and action falls below the action's rate), so the true value of any
one-slot policy on these decisions is known exactly, and the estimates must cover it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from engine.analytics.evaluate import Candidate, evaluate, read_logged
from engine.decision.funnel import DecisionEngine
from engine.models.experiment import ExplorationConfig
from engine.rules.contact import ControlGroup
from engine.sim.telco import SCHEMA

from .test_contact import decide
from .test_logging_policy import make
from .test_scenarios import customer

RATE = {"upsell_fiber_speed": 0.5, "cross_sell_tv": 0.1, "cross_sell_security_suite": 0.35}


def accepts(cid: str, action: str) -> bool:
    u = int.from_bytes(hashlib.blake2b(f"{cid}|{action}".encode(), digest_size=8).digest(), "little") / 2**64
    return u < RATE.get(action, 0.2)


def play(engine: DecisionEngine, ids: list[str]) -> list[tuple[str, list[str], str, float]]:
    """One call-center decision per customer, answered by the law; (customer, feasible ids, shown, value)."""
    out = []
    for cid in ids:
        d = decide(engine, cid, "call_center", max_actions=1, explain=True)
        a = d.actions[0]
        if accepts(cid, a.action_id):
            engine.responses.record(d.decision_id, a.action_id, "accepted")
        feasible = [f.action_id for f in d.funnel if f.stage in ("ranked", "cutoff")]
        out.append((cid, feasible, a.action_id, a.value))
    assert engine.decision_log is not None
    engine.decision_log.close()
    return out


@pytest.fixture(scope="module")
def population() -> list[str]:
    control = ControlGroup(0.1)
    return [c for c in (f"EV{i}" for i in range(700)) if not control.contains(c)][:600]


def truth(engine: DecisionEngine, decisions: list, favoured: str | None) -> float:
    """The exact value per 1,000 decisions of the champion's greedy choice (or of always ``favoured`` where it
    could be shown) on these customers."""
    by_id = engine.rules.current.ruleset.by_id
    total = 0.0
    for cid, feasible, _, _ in decisions:
        pick = favoured if favoured in feasible else feasible[0]
        total += by_id[pick].value * accepts(cid, pick)
    return 1000 * total / len(decisions)


def test_the_estimates_cover_the_true_value_of_the_champion_and_of_a_very_different_policy(
        redis_url: str, models_dir: Path, population: list[str]) -> None:
    engine = make(redis_url, models_dir, ExplorationConfig(strategy="epsilon", share=0.5))
    engine.store.save([customer(c) for c in population], SCHEMA)
    decisions = play(engine, population)
    rules = engine.rules.current
    champion = engine.model.current.champion
    logged = read_logged(engine.store.client, SCHEMA, rules.ruleset)
    assert logged.counts["evaluated"] == len(population)
    favoured = "cross_sell_security_suite"
    assert sum(favoured in f and f[0] != favoured for _, f, _, _ in decisions) > 100  # the candidate differs a lot
    result = evaluate(logged, [Candidate("champion", champion), Candidate("favour", champion, {favoured: 1000.0})],
                      champion, SCHEMA, rules.ruleset)
    for entry, true in zip(result["candidates"], (truth(engine, decisions, None), truth(engine, decisions, favoured))):
        assert "refused" not in entry
        for name in ("ips", "snips", "dr"):
            low, high = entry[name]["ci95"]
            assert low <= true <= high, (entry["name"], name, entry[name], true)
        assert abs(entry["dr"]["value"] - true) < 0.35 * true, (entry["name"], entry["dr"], true)
        assert 0 < entry["effective_sample_size"] < len(population)
    diff = result["candidates"][1]["versus_champion"]
    true_diff = truth(engine, decisions, favoured) - truth(engine, decisions, None)
    assert diff["ci95"][0] <= true_diff <= diff["ci95"][1], (diff, true_diff)
    rules.close()


def test_logs_without_exploration_support_no_estimate(redis_url: str, models_dir: Path,
                                                       population: list[str]) -> None:
    """Decisions that did not explore gave every other choice no chance: they are left out, counted, and with
    nothing else logged the estimate is refused, saying why."""
    from engine.analytics.offpolicy import EvaluationError

    engine = make(redis_url, models_dir, ExplorationConfig())
    engine.store.save([customer(c) for c in population[:100]], SCHEMA)
    play(engine, population[:100])
    rules = engine.rules.current
    champion = engine.model.current.champion
    logged = read_logged(engine.store.client, SCHEMA, rules.ruleset)
    assert logged.counts["not_exploring"] == 100 and not logged.decisions
    with pytest.raises(EvaluationError, match="not exploring 100.*exploration strategy epsilon"):
        evaluate(logged, [Candidate("champion", champion)], champion, SCHEMA, rules.ruleset)
    rules.close()


def test_the_commands_estimate_and_promotion_waits_for_the_gate(redis_url: str, models_dir: Path,
                                                                population: list[str], tmp_path: Path) -> None:
    """``nba evaluate`` prints every estimator and the paired difference; ``nba models promote`` shows the
    estimate and refuses a version the gate in experiment.yaml does not let through (the same model under
    another version: its difference from the champion is exactly 0); ``nba rules diff`` shows the estimate of
    the new rule set's values."""
    import json
    import shutil

    from engine.models.registry import ModelRegistry

    from .conftest import RULES_DIR
    from .test_models import run_cli

    engine = make(redis_url, models_dir, ExplorationConfig(strategy="epsilon", share=0.5))
    engine.store.save([customer(c) for c in population[:300]], SCHEMA)
    play(engine, population[:300])
    engine.rules.current.close()
    where = ["--redis-url", redis_url, "--rules-dir", str(RULES_DIR)]
    code, out, err = run_cli("evaluate", *where, "--models-dir", str(models_dir), "--no-archive",
                             "--weight", "cross_sell_security_suite=1000")
    assert code == 0, err
    assert "300 of 300 recorded decisions evaluated" in out and "versus champion (DR)" in out
    assert all(name in out for name in ("IPS", "SNIPS", "DR"))
    code, out, err = run_cli("evaluate", *where, "--models-dir", str(models_dir), "--json", "--weight", "x=-1")
    assert code != 0 and "--weight 'x=-1'" in err

    registry_dir = tmp_path / "models"
    shutil.copytree(models_dir, registry_dir)
    registry = ModelRegistry(registry_dir, SCHEMA)
    champion = registry.champion()
    assert champion is not None
    twin = registry.save((registry.dir / champion / "model.txt").read_text(), list(registry.load().action_levels),
                         {}, {"source": "a copy of the champion"})
    (registry.dir / "experiment.yaml").write_text("promotion:\n  require: above_champion\n  min_effective_sample_size: 10\n")
    code, out, err = run_cli("models", "promote", twin, "--models-dir", str(registry_dir), *where)
    assert code == 1 and "promotion gate (above_champion)" in err and "+0.0..+0.0" in err, err
    assert f"{twin} (model {twin})" in out and registry.champion() == champion
    code, _, err = run_cli("models", "promote", twin, "--force", "--models-dir", str(registry_dir), *where)
    assert code == 0 and registry.champion() == twin and "promoted anyway (--force)" in err
    registry.promote(champion)
    (registry.dir / "experiment.yaml").write_text("promotion:\n  require: not_below_champion\n")
    code, out, err = run_cli("models", "promote", twin, "--models-dir", str(registry_dir), *where)
    assert code == 0 and registry.champion() == twin, err

    new_rules = tmp_path / "rules"
    shutil.copytree(RULES_DIR, new_rules)
    catalog = new_rules / "catalog.yaml"
    text = catalog.read_text()
    at = text.index("id: cross_sell_tv\n")
    at = text.index("value: 100\n", at)
    catalog.write_text(text[:at] + "value: 100000\n" + text[at + len("value: 100\n"):])
    code, out, err = run_cli("rules", "diff", str(RULES_DIR), str(new_rules), "--models-dir", str(models_dir),
                             "--redis-url", redis_url, "--json")
    assert code == 0, err
    estimate = json.loads(out)["off_policy"]
    assert estimate["decisions"]["evaluated"] == 300, estimate
    same, new = estimate["candidates"]
    assert new["name"] == str(new_rules) and new["ips"] != same["ips"]
    assert new["versus_champion"]["value"] < 0  # leading with the TV offer everywhere earns less


def test_demo_traffic_then_evaluate_from_the_archive_as_from_the_streams(redis_url: str, models_dir: Path,
                                                                          tmp_path: Path) -> None:
    """``nba seed --decisions`` plays demo traffic with experiment.yaml's exploration; the archived rows carry
    the probabilities, and the estimate read through the archive equals the one from the streams."""
    import shutil

    import pyarrow.parquet as pq

    from engine.store.archive import ArchiveWriter

    from .conftest import RULES_DIR
    from .test_models import run_cli

    registry_dir = tmp_path / "models"
    shutil.copytree(models_dir, registry_dir)
    (registry_dir / "propensity" / "experiment.yaml").write_text("exploration:\n  strategy: epsilon\n  share: 0.25\n")
    where = ["--redis-url", redis_url, "--rules-dir", str(RULES_DIR), "--models-dir", str(registry_dir)]
    code, out, err = run_cli("seed", *where, "--customers", "400", "--decisions", "300")
    assert code == 0 and "played 300 decisions" in out, err
    code, streams, err = run_cli("evaluate", *where, "--no-archive", "--json", "--weight", "retention=3")
    assert code == 0, err
    from engine.store.profiles import redis_client

    with ArchiveWriter(redis_client(redis_url), tmp_path / "archive", trim=False) as writer:
        assert writer.once() > 0
    rows = pq.read_table(next((tmp_path / "archive" / "decisions").rglob("*.parquet")),
                         columns=["probabilities", "epsilon", "choice_sets"]).to_pylist()
    assert rows and all(r["epsilon"] in ("0", "0.25") and r["probabilities"] is not None for r in rows)
    code, archived, err = run_cli("evaluate", *where, "--archive", str(tmp_path / "archive"), "--json",
                                  "--weight", "retention=3")
    assert code == 0, err
    assert json.loads(archived)["candidates"] == json.loads(streams)["candidates"]
    assert json.loads(streams)["decisions"]["evaluated"] > 200
