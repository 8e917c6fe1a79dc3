"""``nba import customers``: CSV and Parquet into profile hashes as domain.yaml declares them, every bad
row reported with its row and column and never written, the good ones written whole."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
import redis

from engine.cli import main
from engine.rules.loader import load_domain_file
from engine.sim.telco import SCHEMA
from engine.sim.world import generate
from engine.store import bulk
from engine.store.bulk import ImportRefused, import_customers
from engine.store.profiles import LAYOUTS_KEY, Profile, ProfileStore, encode_profile, profile_key, redis_client

from .conftest import RULES_DIR


def world_columns(n: int, seed: int = 3, separator: str = ";") -> tuple[dict[str, list | np.ndarray], list[Profile]]:
    """Columns of ``n`` demo customers, and the profiles they hold (no open case ids: an import has none)."""
    world = generate(n, seed)
    profiles = list(world.profiles())
    for p in profiles:
        p.open_cases = ()
    columns: dict[str, list | np.ndarray] = {"customer_id": [p.customer_id for p in profiles]}
    for j, name in enumerate(SCHEMA.numeric):
        columns[name] = world.numeric[:, j]
    for name in SCHEMA.categorical:
        columns[name] = [p.categorical[name] for p in profiles]
    for name in SCHEMA.sets:
        columns[name] = [separator.join(sorted(p.sets[name])) for p in profiles]
    return columns, profiles


def stored(client: redis.Redis, ids: list[str]) -> list[dict[bytes, bytes]]:
    return [client.hgetall(profile_key(cid)) for cid in ids]


def encoded(profile: Profile) -> dict[bytes, bytes]:
    return {k.encode(): v if isinstance(v, bytes) else str(v).encode() for k, v in encode_profile(profile, SCHEMA).items()}


@pytest.mark.both_redis
def test_csv_and_parquet_load_and_read_back_equal(tmp_path: Path, redis_url: str) -> None:
    columns, profiles = world_columns(300)
    table = pa.table(columns)
    pcsv.write_csv(table, tmp_path / "customers.csv")
    with_lists = table.set_column(table.schema.get_field_index("products"), "products",
                                  pa.array([sorted(p.sets["products"]) for p in profiles], pa.list_(pa.string())))
    pq.write_table(with_lists, tmp_path / "customers.parquet")
    store = ProfileStore.from_url(redis_url)
    ids = [p.customer_id for p in profiles]

    report = import_customers(store, tmp_path / "customers.csv", SCHEMA, batch=64)
    assert (report.rows, report.loaded, report.rejected, report.ignored, report.defaulted) == (300, 300, [], (), ())
    for p in profiles:
        back = store.fetch(p.customer_id, SCHEMA)
        assert back.found
        np.testing.assert_array_equal(back.numeric, p.numeric)
        assert (back.categorical, back.sets, back.open_cases) == (p.categorical, p.sets, ())
    first = stored(store.client, ids)
    assert first == [encoded(p) for p in profiles]  # what ProfileStore.save writes, byte for byte
    assert store.client.hget(LAYOUTS_KEY, SCHEMA.layout()) == ",".join(SCHEMA.numeric).encode()

    again = import_customers(store, tmp_path / "customers.csv", SCHEMA)  # idempotent
    assert again.loaded == 300 and stored(store.client, ids) == first
    for cid in ids[:50]:
        store.client.delete(profile_key(cid))
    report = import_customers(store, tmp_path / "customers.parquet", SCHEMA)
    assert (report.rows, report.loaded, report.rejected) == (300, 300, [])
    assert stored(store.client, ids) == first


@pytest.mark.both_redis
def test_scripts_flushed_mid_import_are_loaded_again(tmp_path: Path, redis_url: str, redis_admin_url: str,
                                                     monkeypatch) -> None:
    columns, profiles = world_columns(120)
    pq.write_table(pa.table(columns), tmp_path / "c.parquet")
    monkeypatch.setattr(bulk, "_PARQUET_ROWS", 30)
    store = ProfileStore.from_url(redis_url)
    admin = redis_client(redis_admin_url)  # SCRIPT FLUSH, as a failover or restart would: not the service's
    check, chunks = bulk._check, []

    def flushing(*args, **kwargs):
        chunks.append(1)
        if len(chunks) == 3:  # a batch of the last chunk is still unanswered: every later one meets NOSCRIPT
            admin.script_flush()
        return check(*args, **kwargs)

    monkeypatch.setattr(bulk, "_check", flushing)
    report = import_customers(store, tmp_path / "c.parquet", SCHEMA, batch=10)
    assert report.loaded == 120 and len(chunks) == 4
    assert stored(store.client, [p.customer_id for p in profiles]) == [encoded(p) for p in profiles]


BAD = [
    "customer_id,age,monthly_spend,plan,segment,products,consent,churn_risk,start_date",  # row 0
    "C1,30,50.5,standard,student,mobile;tv,web|email,0.5,x",                  # 1 good
    "C2,abc,50,standard,student,,,0.1,",                                      # 2 wrong type
    ",31,50,standard,student,,,0.1,",                                         # 3 missing id
    "C4,31,50,platinum,student,,,0.1,",                                       # 4 unknown level
    "C5,200,50,standard,student,,,0.1,",                                      # 5 above the maximum
    "C6,40,50,standard,student,mobile;teleport,,0.1,",                        # 6 unknown product
    "C1,41,50,standard,student,,,0.1,",                                       # 7 duplicate of row 1
    "C8,42,7e1,unlimited,family,\"mobile| tv ,broadband,tv\",sms,0.2,",       # 8 good, mixed separators
    "C 9,43,50,standard,student,,,0.1,",                                      # 9 invalid id
    "C10,44,50,standard,student,,,inf,",                                      # 10 not finite
    "",                                                                       # 11 an empty line: skipped
    "C12,45,50",                                                              # 12 too few cells
    "C13,46,-5,standard,Student,,pigeon,0.1,",                                # 13 three bad cells
    "C14,,,,,,,,",                                                            # 14 good: every default
    " C15 , 47 , 60 , sim_only , senior , fiber , call_center , 1 ,",         # 15 good, spaces trimmed
]


def test_bad_rows_are_reported_and_the_good_ones_load(tmp_path: Path, redis_url: str, monkeypatch) -> None:
    monkeypatch.setattr(bulk, "_CSV_BLOCK", 200)  # several blocks: row numbers and duplicates across them
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(BAD) + "\n")
    store = ProfileStore.from_url(redis_url)
    report = import_customers(store, path, SCHEMA)
    got = [(r.row, r.column, r.value, r.why) for r in report.rejected]
    levels = ", ".join(SCHEMA.categorical["plan"])
    assert got == [
        (2, "age", "abc", "not a number"),
        (3, "customer_id", "", "missing customer id"),
        (4, "plan", "platinum", f"unknown level; levels: {levels}"),
        (5, "age", "200", "above the maximum 130"),
        (6, "products", "mobile;teleport", "unknown member 'teleport'; members: " + ", ".join(SCHEMA.products)),
        (7, "customer_id", "C1", "duplicate of row 1 (the first row of an id counts)"),
        (9, "customer_id", "C 9", "invalid customer id: at most 128 characters, no spaces, tabs, newlines or braces"),
        (10, "churn_risk", "inf", "not a finite number (at most 3.4e+38 in size)"),
        (12, "*", "C12,45,50", "3 cells, the header has 9"),
        (13, "monthly_spend", "-5", "below the minimum 0"),
        (13, "segment", "Student", "unknown level; levels: " + ", ".join(SCHEMA.categorical["segment"])),
        (13, "consent", "pigeon", "unknown member 'pigeon'; members: " + ", ".join(SCHEMA.channel_names)),
    ]
    assert (report.rows, report.loaded, report.rejected_rows) == (14, 4, 10)
    assert report.ignored == ("start_date",)
    assert "tenure_months" in report.defaulted and "age" not in report.defaulted
    loaded = {cid: store.fetch(cid, SCHEMA) for cid in ("C1", "C2", "C4", "C5", "C6", "C8", "C10", "C12", "C13", "C14", "C15")}
    assert {cid for cid, p in loaded.items() if p.found} == {"C1", "C8", "C14", "C15"}
    assert not store.client.exists(profile_key("C 9"))
    c1, c8, c14, c15 = loaded["C1"], loaded["C8"], loaded["C14"], loaded["C15"]
    assert c1.value("age", SCHEMA) == 30 and c1.sets == {"products": {"mobile", "tv"}, "consent": {"web", "email"}}
    assert c8.value("monthly_spend", SCHEMA) == 70 and c8.sets["products"] == {"mobile", "tv", "broadband"}
    assert c8.categorical["segment"] == "family"
    # empty cells and absent columns: the declared defaults (plan none, value_tier C, numbers 0), no set member
    assert not c14.numeric.any() and c14.sets == {"products": frozenset(), "consent": frozenset()}
    assert c14.categorical == {"plan": "none", "segment": "", "lifecycle_stage": "prospect", "value_tier": "C",
                               "region": "", "device_os": "none"}
    assert (c15.value("age", SCHEMA), c15.value("churn_risk", SCHEMA), c15.categorical["plan"]) == (47, 1, "sim_only")
    assert c15.sets == {"products": {"fiber"}, "consent": {"call_center"}}

    text = report.render(shown=3)
    assert f"{path}:2:age: not a number (value 'abc')" in text and "... and 9 more" in text
    assert "4 of 14 rows loaded" in text and "ignored columns" in text and "start_date" in text
    rows = report.as_dict()
    assert rows["rejected_rows"] == 10 and rows["rejected"][0] == {"row": 2, "column": "age", "value": "abc",
                                                                   "why": "not a number"}


DOMAIN = """\
attributes:
  balance: {type: number, min: 0, max: 1000, default: 5}
  last_visit: {type: date}
  tier: {type: category, levels: [basic, gold], default: basic}
  products: {type: set, members: [card, "savings|plus", loan]}
channels:
  desk: {direction: inbound}
action_types:
  offer: {}
"""


def test_dates_bounds_and_separators_of_a_declared_domain(tmp_path: Path, redis_url: str, monkeypatch) -> None:
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "domain.yaml").write_text(DOMAIN)
    schema = load_domain_file(tmp_path / "rules")
    day = 19_874.0  # 2024-05-31
    lines = ["id,BALANCE,last_visit,tier,products",
             "A,1000,2024-05-31,gold,card;savings|plus",            # | belongs to a member here: only , and ; separate
             "B,,2024-05-31T12:00:00+02:00,,loan",
             "C,0.5,2024-05-31 18:00Z,basic,",
             "D,1,,,",
             "E,2,31/05/2024,,",
             "F,3,2024-13-01,,",
             "G,1000.5,2024-05-31T06:00,,"]
    path = tmp_path / "bank.csv.gz"
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    store = ProfileStore.from_url(redis_url)
    report = import_customers(store, path, schema, id_column="id")
    assert report.mapping == {"BALANCE": "balance", "last_visit": "last_visit", "tier": "tier", "products": "products"}
    iso = "not an ISO date or date-time (e.g. 2024-05-31 or 2024-05-31T14:30:00+02:00)"
    assert [(r.row, r.column, r.why) for r in report.rejected] == [
        (5, "last_visit", iso), (6, "last_visit", iso), (7, "BALANCE", "above the maximum 1000")]
    assert report.defaulted == ("consent",)
    got = {cid: store.fetch(cid, schema) for cid in "ABCD"}
    vectors = {cid: (p.value("balance", schema), p.value("last_visit", schema)) for cid, p in got.items()}
    assert vectors["A"] == (1000, day) and vectors["C"] == (0.5, np.float32(day + 0.75))
    assert vectors["B"] == (5, np.float32(day + 10 / 24))  # the declared default; 12:00+02:00 is 10:00 UTC
    assert vectors["D"][0] == 1 and np.isnan(vectors["D"][1])  # no date: unknown
    assert got["A"].sets["products"] == {"card", "savings|plus"} and got["B"].categorical["tier"] == "basic"

    # Parquet: typed columns (date32, zoned timestamps, integers) taken as they are; several chunks
    monkeypatch.setattr(bulk, "_PARQUET_ROWS", 2)
    table = pa.table({"id": ["P1", "P2", "P3", "P1", "P5"],
                      "balance": pa.array([1, None, 7, 8, -1], pa.int64()),
                      "last_visit": pa.array([None, 19_874, 0, 1, 2], pa.date32()),
                      "tier": pa.array(["gold", "basic", None, "gold", "gold"]).dictionary_encode(),
                      "products": pa.array([["card", "loan"], None, [], ["card"], ["card"]])})
    pq.write_table(table, tmp_path / "bank.parquet")
    report = import_customers(store, tmp_path / "bank.parquet", schema, id_column="id",
                              mapping={"last_visit": "last_visit"})
    assert [(r.row, r.column, r.value, r.why) for r in report.rejected] == [
        (4, "id", "P1", "duplicate of row 1 (the first row of an id counts)"), (5, "balance", "-1", "below the minimum 0")]
    p1, p2 = store.fetch("P1", schema), store.fetch("P2", schema)
    assert p1.value("balance", schema) == 1 and np.isnan(p1.value("last_visit", schema))
    assert p1.sets["products"] == {"card", "loan"} and p1.categorical["tier"] == "gold"
    assert (p2.value("balance", schema), p2.value("last_visit", schema), p2.sets["products"]) == (5, day, frozenset())
    noon = (day * 86_400 + 12 * 3_600) * 10**9  # 2024-05-31 12:00 UTC in ns: 14:00 at +02:00
    pq.write_table(pa.table({"id": ["Q1", "Q2"], "last_visit": pa.array([noon, None], pa.timestamp("ns", tz="+02:00"))}),
                   tmp_path / "zoned.parquet")
    assert import_customers(store, tmp_path / "zoned.parquet", schema, id_column="id").loaded == 2
    assert store.fetch("Q1", schema).value("last_visit", schema) == np.float32(day + 0.5)
    assert np.isnan(store.fetch("Q2", schema).value("last_visit", schema))


def test_unusable_input_is_refused_before_anything_is_written(tmp_path: Path, redis_url: str,
                                                              redis_admin_url: str) -> None:
    store = ProfileStore.from_url(redis_url)
    path = tmp_path / "c.csv"
    path.write_text("id,age\nC1,3\n")
    with pytest.raises(ImportRefused, match="no such file"):
        import_customers(store, tmp_path / "missing.csv", SCHEMA)
    with pytest.raises(ImportRefused, match="no id column 'customer_id'"):
        import_customers(store, path, SCHEMA)
    with pytest.raises(ImportRefused, match="no attribute 'agee'"):
        import_customers(store, path, SCHEMA, id_column="id", mapping={"age": "agee"})
    (tmp_path / "c.txt").write_text("id\n")
    with pytest.raises(ImportRefused, match="unknown file type"):
        import_customers(store, tmp_path / "c.txt", SCHEMA)
    (tmp_path / "twice.csv").write_text("customer_id,age,age\nC1,3,4\n")
    with pytest.raises(ImportRefused, match="names column 'age' twice"):
        import_customers(store, tmp_path / "twice.csv", SCHEMA)
    assert redis.Redis.from_url(redis_admin_url).dbsize() == 0


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_cli_prints_the_report_and_exits_1_with_rejections(tmp_path: Path, redis_url: str, capsys) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(BAD) + "\n")
    common = ("--redis-url", redis_url, "--rules-dir", str(RULES_DIR))
    code, out, err = run(capsys, "import", "customers", str(path), *common, "--report", str(tmp_path / "r.csv"),
                         "--map", "start_date=tenure_months")
    assert code == 1, err
    assert "3 of 14 rows loaded" in out and f"{path}:5:age: above the maximum 130 (value '200')" in out
    assert "wrote 13 rejections" in err
    with open(tmp_path / "r.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["file", "row", "column", "value", "reason"] and len(rows) == 14
    assert rows[1] == [str(path), "1", "start_date", "x", "not a number"]  # mapped by --map: a number now
    assert rows[2] == [str(path), "2", "age", "abc", "not a number"]

    good = tmp_path / "good.csv"
    good.write_text("customer_id,age,products\nZ1,30,mobile\n")
    code, out, _err = run(capsys, "import", "customers", str(good), *common, "--json")
    assert code == 0 and json.loads(out)["loaded"] == 1 and json.loads(out)["rejected"] == []
    code, _out, err = run(capsys, "import", "customers", str(tmp_path / "nope.csv"), *common)
    assert code == 2 and "no such file" in err
    code, _out, err = run(capsys, "import", "customers", str(good), *common, "--id-column", "cid")
    assert code == 2 and "no id column 'cid'" in err
    code, _out, err = run(capsys, "import", "customers", str(good), *common, "--map", "age")
    assert code == 2 and "COLUMN=ATTRIBUTE" in err
