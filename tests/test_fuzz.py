"""Fuzzing (issue 14, item 5): hostile input never becomes INTERNAL, a traceback or a broken live set.

1. gRPC messages against a real server and a real Redis (the ``service`` fixture, one server per test
   function reused across examples): generated ``DecideRequest``, ``RecordResponseRequest`` and
   ``PublishEventRequest`` (empty, random and huge ids, enum values outside the enums, huge and empty
   maps, extreme and invalid timestamps), invalid UTF-8 patched into the serialised bytes of any string
   field or map entry, and raw garbage bytes. The status is never ``INTERNAL`` or ``UNKNOWN``, nothing
   is logged at ERROR, and a normal Decide is answered afterwards.
2. Rule files: mutations of the demo files in ``rules/`` (lines deleted, duplicated, swapped,
   re-indented, tokens replaced, truncation, odd unicode) through ``nba rules check`` and a live
   server's ``reload_rules``: OK, or errors each at ``file:line:col`` with a message; a refused reload
   leaves the live rule set as it was and Decide keeps working.
3. Model files: a trained version copied and corrupted (truncated, lines lost, wrong tree fields,
   NaN / inf thresholds and leaf values, features out of range, no trees, wrong objective, broken
   ``schema.json``) through ``ModelRegistry.load`` / ``promote`` and a live server's ``ModelWatcher``:
   a ``ModelRefused`` with a message, or a model whose scores are probabilities and whose decision
   scorer equals its tree walker; the live model keeps serving.

The suite runs a bounded number of examples (30 to 80 per test, about 30 s for the file on 2 busy
cores), the same ones on every run (tests/properties.py's ``repeatable`` profile), so a failure in CI is a failure
anyone reproduces. The exploring run draws new random examples, ``properties.EXPLORE_FACTOR`` (50) times
as many (1,500 to 4,000 per test, about 20 minutes on 2 cores), before a release or after a change to
parsing, validation or model loading::

    HYPOTHESIS_PROFILE=explore .venv/bin/python -m pytest tests/test_fuzz.py -q -p no:cacheprovider

A failure prints the falsifying example and a ``@reproduce_failure`` blob. A bug found is fixed and its
example kept as an ``@example`` (or a plain test) here, with a comment saying what it broke.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import shutil
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from engine.api.nba.v1 import nba_pb2 as pb
from engine.api.nba.v1 import nba_pb2_grpc as pb_grpc
from engine.authoring.check import check
from engine.config import Config
from engine.models.model_input import model_input
from engine.models.registry import LoadedModel, ModelRefused, ModelRegistry
from engine.rules.errors import RuleError
from engine.serving.app import App
from engine.serving.server import build_server
from engine.sim.telco import SCHEMA

from .conftest import REPO, RULES_DIR, as_admin, local_auth
from .properties import examples

FEATURES, ROW_FEATURES = model_input(SCHEMA).features, model_input(SCHEMA).row_features

# The servers and registries are built once per test function and reused by its examples (hence
# function_scoped_fixture).
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                     HealthCheck.function_scoped_fixture])


def fuzz(n: int) -> settings:
    """``n`` examples (properties.examples: more in the exploring run), without deadlines or size checks."""
    return settings(FUZZ, max_examples=examples(n))


BAD = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
DECIDE = "/nba.v1.DecisionService/Decide"
RESPOND = "/nba.v1.DecisionService/RecordResponse"
PUBLISH = "/nba.v1.DecisionService/PublishEvent"
REPLIES = {DECIDE: pb.DecideResponse, RESPOND: pb.RecordResponseResponse, PUBLISH: pb.PublishEventResponse}
INT32 = st.integers(-2**31, 2**31 - 1)
INT64 = st.integers(-2**63, 2**63 - 1)


def call_raw(channel: grpc.Channel, method: str, data: bytes) -> grpc.StatusCode:
    """Send ``data`` as the serialised request of ``method``; the status code it got."""
    fn = channel.unary_unary(method, request_serializer=None, response_deserializer=REPLIES[method].FromString)
    try:
        fn(data, timeout=20)
    except grpc.RpcError as err:
        assert err.code() not in BAD, f"{method}: {err.code().name}: {err.details()}"
        return err.code()
    return grpc.StatusCode.OK


def still_serves(channel: grpc.Channel) -> pb.DecideResponse:
    reply = pb_grpc.DecisionServiceStub(channel).Decide(
        pb.DecideRequest(customer_id="C0000042", channel=pb.CHANNEL_WEB, max_actions=3), timeout=20)
    assert reply.decision_id and reply.actions
    return reply


@contextlib.contextmanager
def no_errors_logged(caplog: pytest.LogCaptureFixture):
    """Nothing of ours logs at ERROR (a traceback caught in a handler or a background thread)."""
    with caplog.at_level(logging.WARNING, logger="engine"):
        yield
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("engine")]
    assert not errors, "\n".join(f"{r.name}: {r.getMessage()}\n{r.exc_text or ''}" for r in errors[:3])


# --- 1. gRPC messages ---------------------------------------------------------------------------------

ODD_CHARS = "\x00\x01\t\n\r {}|:;,\"'\\/%*?~`#\x7f\x85\u00a0\u200b\u200d\u2028\u202e\ufeff\ufffd\U0001f600\U000e0041"
TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)  # protobuf refuses lone surrogates
ODD_TEXT = st.text(st.sampled_from(ODD_CHARS + "aZ09-_."), max_size=20)


@st.composite
def huge_text(draw) -> str:
    """A long string: a few hundred characters up to past the server's message limit (1 MiB)."""
    unit = draw(st.sampled_from(["x", "é", "\U0001f600", "C0", "{", " "]))
    n = draw(st.sampled_from([129, 257, 1_000, 70_000, 600_000]))
    return unit * n


def strings(*known: str) -> st.SearchStrategy[str]:
    return st.one_of(st.just(""), st.sampled_from(known) if known else st.nothing(), TEXT, ODD_TEXT, huge_text())


def maps(keys: st.SearchStrategy[str], values: st.SearchStrategy[str]) -> st.SearchStrategy[dict[str, str]]:
    big = st.builds(lambda n, v: {f"k{i}": v for i in range(n)}, st.sampled_from([65, 1_000, 20_000]),
                    st.sampled_from(["", "v", "x" * 200]))
    return st.one_of(st.just({}), st.dictionaries(keys, values, max_size=8), big)


def enum(valid: int) -> st.SearchStrategy[int]:
    """An enum field: a declared value, or any int32 (proto3 enums are open: the server gets the number)."""
    return st.one_of(st.integers(0, valid), st.sampled_from([valid + 1, 99, -1, 2**31 - 1, -2**31]), INT32)


@st.composite
def timestamps(draw, now: float) -> Timestamp | None:
    kind = draw(st.sampled_from(["none", "near", "any", "edge"]))
    if kind == "none":
        return None
    if kind == "near":
        seconds = draw(st.integers(int(now) - 10 * 86_400, int(now) + 3_600))
        nanos = draw(st.integers(0, 999_999_999))
    elif kind == "edge":
        seconds = draw(st.sampled_from([0, -1, 1, -62135596800, -62135596801, 253402300799, 253402300800,
                                        2**31, 2**53, 2**63 - 1, -2**63]))
        nanos = draw(st.sampled_from([0, 999_999_999, 1_000_000_000, -1, 2**31 - 1, -2**31]))
    else:
        seconds, nanos = draw(INT64), draw(INT32)
    return Timestamp(seconds=seconds, nanos=nanos)


@st.composite
def decide_requests(draw) -> pb.DecideRequest:
    return pb.DecideRequest(
        customer_id=draw(strings("C0000042", "C0000001", "unknown-customer")),
        channel=draw(enum(7)),
        touchpoint=draw(strings("web.home.hero", "call_center.inbound")),
        context=draw(maps(strings("intent", "outbound_action"), strings("cancel", "upgrade"))),
        max_actions=draw(st.one_of(st.integers(-2, 25), INT32)),
        explain=draw(st.booleans()),
        interaction_id=draw(st.one_of(strings("call-1"), ODD_TEXT)),
        preview=draw(st.booleans()),
    )


def test_decide_requests_never_fail_internally(service, caplog) -> None:
    _, channel = service

    @fuzz(60)
    @given(decide_requests())
    @example(pb.DecideRequest(customer_id="C0000042", channel=99, max_actions=-5))
    @example(pb.DecideRequest(customer_id="C0000042", channel=pb.CHANNEL_WEB, max_actions=2**31 - 1,
                              context={f"k{i}": "v" for i in range(1_000)}, interaction_id="a|b{c}"))
    @example(pb.DecideRequest(customer_id="x" * 600_000, channel=pb.CHANNEL_WEB))
    def run(request: pb.DecideRequest) -> None:
        call_raw(channel, DECIDE, request.SerializeToString())
        still_serves(channel)

    with no_errors_logged(caplog):
        run()


def test_record_response_requests_never_fail_internally(service, caplog) -> None:
    _, channel = service
    decided = pb_grpc.DecisionServiceStub(channel).Decide(
        pb.DecideRequest(customer_id="C0000007", channel=pb.CHANNEL_CALL_CENTER, max_actions=3), timeout=20)
    now = time.time()

    @fuzz(60)
    @given(st.builds(pb.RecordResponseRequest, decision_id=strings(decided.decision_id),
                     action_id=strings(*[a.action_id for a in decided.actions]), outcome=enum(5),
                     timestamp=timestamps(now)))
    # a Timestamp out of range (seconds past year 9999, nanos < 0) was INTERNAL: ValueError in ToNanoseconds
    @example(pb.RecordResponseRequest(decision_id=decided.decision_id, action_id=decided.actions[0].action_id,
                                      outcome=pb.OUTCOME_CLICKED, timestamp=Timestamp(seconds=2**63 - 1)))
    @example(pb.RecordResponseRequest(decision_id=decided.decision_id, action_id=decided.actions[0].action_id,
                                      outcome=pb.OUTCOME_CLICKED, timestamp=Timestamp(seconds=int(now), nanos=-5)))
    @example(pb.RecordResponseRequest(decision_id=decided.decision_id, action_id=decided.actions[0].action_id,
                                      outcome=pb.OUTCOME_ACCEPTED, timestamp=Timestamp(seconds=-62135596800)))
    @example(pb.RecordResponseRequest(decision_id="d1", action_id="a1", outcome=99))
    @example(pb.RecordResponseRequest(decision_id=decided.decision_id, action_id=decided.actions[0].action_id,
                                      outcome=pb.OUTCOME_IMPRESSION,  # the last valid Timestamp: year 10000 as a float
                                      timestamp=Timestamp(seconds=253402300799, nanos=999_999_999)))
    def run(request: pb.RecordResponseRequest) -> None:
        call_raw(channel, RESPOND, request.SerializeToString())
        still_serves(channel)

    with no_errors_logged(caplog):
        run()


def test_publish_event_requests_never_fail_internally(service, caplog) -> None:
    app, channel = service
    events = app.rules.current.ruleset.events
    assert events is not None
    types = sorted(events.types)
    attributes = sorted({a for t in events.types.values() for a in t.attributes})
    levels = sorted({lv for t in events.types.values() for a in t.attributes.values() for lv in a.levels})
    values = st.one_of(strings(*levels), st.sampled_from(["0", "-0", "1e309", "-inf", "nan", "NaN", "0x10", "1_000",
                                                          "\u0661\u0662", "9" * 400, " 1 ", "1e-400"]))
    now = time.time()

    @fuzz(60)
    @given(st.builds(pb.PublishEventRequest, event_id=strings("e1", "e2"), customer_id=strings("C0000042", "C0000003"),
                     type=strings(*types), attributes=maps(strings(*attributes), values), timestamp=timestamps(now)))
    # as for RecordResponse: an out-of-range Timestamp was INTERNAL
    @example(pb.PublishEventRequest(event_id="e-max", customer_id="C0000042", type="payment_failed",
                                    attributes={"amount": "10"}, timestamp=Timestamp(seconds=2**63 - 1)))
    @example(pb.PublishEventRequest(event_id="e-nanos", customer_id="C0000042", type="payment_failed",
                                    attributes={"amount": "10"}, timestamp=Timestamp(seconds=int(now), nanos=2**31 - 1)))
    @example(pb.PublishEventRequest(event_id="e-min", customer_id="C0000042", type="consent_withdrawn",
                                    attributes={"channel": "sms"}, timestamp=Timestamp(seconds=-2**63)))
    def run(request: pb.PublishEventRequest) -> None:
        call_raw(channel, PUBLISH, request.SerializeToString())
        still_serves(channel)

    with no_errors_logged(caplog):
        run()


MARK = "QQFUZZMARKQQ"  # 12 ASCII bytes, replaced in the serialised message by 12 bytes that are not UTF-8


def _with_mark(method: str, where: str) -> bytes:
    """A valid request of ``method`` whose ``where`` (a string field, or a map's key / value) is MARK."""
    base: dict = {
        DECIDE: dict(customer_id="C0000042", channel=pb.CHANNEL_WEB, touchpoint="web.home", interaction_id="i-1",
                     context={"intent": "cancel"}),
        RESPOND: dict(decision_id="d-1", action_id="a-1", outcome=pb.OUTCOME_CLICKED),
        PUBLISH: dict(event_id="e-1", customer_id="C0000042", type="payment_failed", attributes={"amount": "1"}),
    }[method]
    field, _, part = where.partition(".")
    if part == "key":
        base[field] = {MARK: "v"}
    elif part == "value":
        base[field] = {"k": MARK}
    else:
        base[field] = MARK
    message = {DECIDE: pb.DecideRequest, RESPOND: pb.RecordResponseRequest, PUBLISH: pb.PublishEventRequest}[method]
    return message(**base).SerializeToString()


STRING_FIELDS = [(DECIDE, f) for f in ("customer_id", "touchpoint", "interaction_id", "context.key", "context.value")] + [
    (RESPOND, f) for f in ("decision_id", "action_id")] + [
    (PUBLISH, f) for f in ("event_id", "customer_id", "type", "attributes.key", "attributes.value")]


@st.composite
def not_utf8(draw) -> bytes:
    """12 bytes with at least one byte that cannot appear in UTF-8 there (a lone continuation byte,
    an overlong lead byte or one past U+10FFFF)."""
    raw = bytearray(draw(st.binary(min_size=len(MARK), max_size=len(MARK))))
    raw[draw(st.integers(0, len(MARK) - 1))] = draw(st.sampled_from([0x80, 0xBF, 0xC0, 0xC1, 0xF5, 0xF8, 0xFE, 0xFF]))
    try:  # a continuation byte after a lead byte is valid UTF-8 after all (the exploring run drew C2 80)
        bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return bytes(raw)
    assume(False)
    return b""


def test_invalid_utf8_and_garbage_bytes_are_refused_as_invalid_arguments(service, caplog) -> None:
    _, channel = service

    @fuzz(60)
    @given(st.sampled_from(STRING_FIELDS), not_utf8())
    # grpc answered INTERNAL ("Exception deserializing request!") to every request that did not parse
    @example((DECIDE, "customer_id"), b"C\xff\xfe000000001")
    @example((PUBLISH, "attributes.value"), b"\xc0\x80" * 6)
    def patched(target: tuple[str, str], bad: bytes) -> None:
        method, where = target
        data = _with_mark(method, where)
        assert data.count(MARK.encode()) == 1
        code = call_raw(channel, method, data.replace(MARK.encode(), bad))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        still_serves(channel)

    @fuzz(40)
    @given(st.sampled_from([DECIDE, RESPOND, PUBLISH]), st.binary(max_size=64))
    @example(DECIDE, b"\xff\xff\xff")
    @example(PUBLISH, b"\x0a\x05\xff")  # field 1 says 5 bytes follow; 1 does
    def garbage(method: str, data: bytes) -> None:
        call_raw(channel, method, data)
        still_serves(channel)

    with no_errors_logged(caplog):
        patched()
        garbage()


def test_admin_requests_never_fail_internally(service, caplog) -> None:
    _, channel = service
    methods = {"/nba.v1.AdminService/ExportCustomer": (pb.ExportCustomerRequest, pb.ExportCustomerResponse),
               "/nba.v1.AdminService/ForgetCustomer": (pb.ForgetCustomerRequest, pb.ForgetCustomerResponse)}

    @fuzz(30)
    @given(st.sampled_from(sorted(methods)), strings("C0000042", "C0000003", "*", "nba:*", "{c:C0000001}"))
    @example("/nba.v1.AdminService/ExportCustomer", "")
    def run(method: str, customer_id: str) -> None:
        request, reply = methods[method]
        fn = channel.unary_unary(method, request_serializer=request.SerializeToString, response_deserializer=reply.FromString)
        try:
            fn(request(customer_id=customer_id), timeout=20)
        except grpc.RpcError as err:
            assert err.code() not in BAD, f"{method}: {err.code().name}: {err.details()}"
        still_serves(channel)

    with no_errors_logged(caplog):
        run()


# --- 2. rule files ------------------------------------------------------------------------------------

RULE_FILES = ("domain.yaml", "catalog.yaml", "policies.yaml", "contact.yaml", "events.yaml", "tests/scenarios.yaml",
              "tests/events.yaml")
ORIGINALS = {name: (RULES_DIR / name).read_text(encoding="utf-8") for name in RULE_FILES}
ODD_UNICODE = ["\u200b", "\ufeff", "\u202e", "\u2028", "\x85", "\x00", "\x07", "\t", "\r", "\u00a0", "\U0001f600", "\ud7ff",
               "\uffff", "\U0010ffff", "\u0301", "ǅ", "İ", "ß", "\u2029", "\x1b[31m"]
TOKENS = ["", "-1", "0", "1e309", "-1e309", ".nan", ".inf", "nan", "0x10", "1_0", "99999999999999999999", "2026-13-01",
          "true", "null", "~", "[", "]", "{", "}", "&a", "*a", "!!python/object:os.system", "!!binary x", "'", '"',
          ":", ": x", "#", "- ", "|", ">", "%", "@", "`", "and", "or", "not", "in", "(", ")", "==", ">=", "'x' in",
          "segment", "profile.", "7d", "0d", "-5d", "100%", "$x", "\\", "<<: *a"]
_TOKEN = re.compile(r"\"[^\"\n]*\"|'[^'\n]*'|-?\d+(?:\.\d+)?|[A-Za-z_][\w.]*|[:\[\]{}\-,>=<!]+")


@st.composite
def mutated_rules(draw) -> dict[str, str]:
    """The demo rule files with 1-3 mutations, each in one file."""
    files = dict(ORIGINALS)
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(RULE_FILES))
        text = files[name]
        lines = text.split("\n")
        i = draw(st.integers(0, len(lines) - 1))
        kind = draw(st.sampled_from(["delete", "duplicate", "swap", "indent", "token", "truncate", "unicode", "text"]))
        if kind == "delete":
            del lines[i]
        elif kind == "duplicate":
            lines.insert(i, lines[i])
        elif kind == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif kind == "indent":
            stripped = lines[i].lstrip(" ")
            lines[i] = draw(st.sampled_from(["", " ", "  ", "   ", "\t", "        "])) + stripped
        elif kind == "token":
            tokens = list(_TOKEN.finditer(lines[i]))
            if tokens:
                m = draw(st.sampled_from(tokens))
                new = draw(st.one_of(st.sampled_from(TOKENS), TEXT))
                lines[i] = lines[i][:m.start()] + new + lines[i][m.end():]
        text = "\n".join(lines)
        if kind == "truncate":
            text = text[:draw(st.integers(0, len(text)))]
        elif kind == "unicode":
            at = draw(st.integers(0, len(text)))
            text = text[:at] + draw(st.sampled_from(ODD_UNICODE)) + text[at:]
        elif kind == "text":
            at = draw(st.integers(0, len(text)))
            text = text[:at] + draw(TEXT) + text[at:]
        files[name] = text
    return files


def write_rules(rules_dir: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = rules_dir / name
        data = text.encode("utf-8", errors="surrogatepass")
        # bytes, not text: reading text turns a "\r" into "\n", so a mutated file looked restored when it
        # was not (the exploring run found it: the next reload then versioned the mutated bytes)
        if path.read_bytes() != data:
            path.write_bytes(data)


def assert_located(errors: list, rules_dir: Path) -> None:
    """Every error is a RuleError at file:line:col inside the file (or just past its end) with a message."""
    for err in errors:
        assert isinstance(err, RuleError), err
        assert err.message.strip() and err.file, err
        assert err.line >= 1 and err.column >= 1, err
        assert re.match(r"^.+:\d+:\d+: \S", str(err)), str(err)
        path = Path(err.file) if Path(err.file).is_absolute() else rules_dir / err.file
        if path.is_file():
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
            assert err.line <= len(lines) + 1, f"{err} (the file has {len(lines)} lines)"
        err.render()


def test_mutated_rule_files_get_located_errors_from_rules_check(tmp_path: Path) -> None:
    from engine import cli

    rules_dir = tmp_path / "rules"
    shutil.copytree(RULES_DIR, rules_dir)

    @fuzz(80)
    @given(mutated_rules())
    @example({**ORIGINALS, "catalog.yaml": ORIGINALS["catalog.yaml"][:1000]})
    @example({**ORIGINALS, "policies.yaml": "\ufeff" + ORIGINALS["policies.yaml"]})
    @example({**ORIGINALS, "contact.yaml": "[" * 5_000})
    @example({**ORIGINALS, "events.yaml": ORIGINALS["events.yaml"].replace(", within: 1d", "", 1)})  # KeyError: 'within'
    def run(files: dict[str, str]) -> None:
        write_rules(rules_dir, files)
        errors = check(rules_dir)
        assert_located(errors, rules_dir)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(["rules", "check", str(rules_dir)])
        assert code == (1 if errors else 0)
        assert "Traceback" not in out.getvalue() + err.getvalue()

    run()


@pytest.fixture()
def reloadable(redis_url: str, models_dir: Path, tmp_path: Path):
    """A served App that reloads its rules only when asked (no file watch, no timers)."""
    rules_dir = tmp_path / "rules"
    shutil.copytree(RULES_DIR, rules_dir)
    app = App(Config(redis_url=redis_url, rules_dir=rules_dir, models_dir=models_dir, demo_customers=200,
                     metrics_port=0, rules_watch_seconds=0, events_poll_seconds=0)).start()
    server, port, _ = build_server(app, "127.0.0.1:0", auth=local_auth())
    server.start()
    channel = as_admin(grpc.insecure_channel(f"127.0.0.1:{port}"))
    yield app, channel, rules_dir
    channel.close()
    server.stop(0).wait()
    app.close()


def test_mutated_rule_files_never_break_a_live_reload(reloadable, caplog) -> None:
    app, channel, rules_dir = reloadable
    original = app.rules.current.version
    admin = pb_grpc.AdminServiceStub(channel)

    @fuzz(50)
    @given(mutated_rules(), st.booleans())
    @example({**ORIGINALS, "events.yaml": ORIGINALS["events.yaml"].replace("within: 1d", "within: -1d", 1)}, False)
    @example({**ORIGINALS, "catalog.yaml": ORIGINALS["catalog.yaml"].replace("\n", "\r", 3)}, False)  # restored?
    @example({**ORIGINALS, "domain.yaml": ORIGINALS["domain.yaml"].replace("type: number", "type: text", 1)}, True)
    @example({**ORIGINALS, "domain.yaml": ORIGINALS["domain.yaml"].replace("  nps:", "  #nps:", 1)}, False)  # model needs it
    def run(files: dict[str, str], over_grpc: bool) -> None:
        before = app.rules.current
        write_rules(rules_dir, files)
        if over_grpc:
            reply = admin.ReloadRules(pb.ReloadRulesRequest(), timeout=30)
            applied, version, errors = reply.applied, reply.ruleset_version, list(reply.errors)
        else:
            applied, version, errors = app.reload_rules(who="fuzz")
        if applied:
            assert not errors and version == app.rules.current.version
        else:
            assert errors and all(re.match(r"^.+:\d+:\d+: \S", e) for e in errors), errors
            assert app.rules.current is before and version == before.version
        assert still_serves(channel).ruleset_version == app.rules.current.version
        write_rules(rules_dir, ORIGINALS)
        applied, version, errors = app.reload_rules(who="fuzz")
        assert applied and version == original, errors
        assert still_serves(channel).ruleset_version == original

    with no_errors_logged(caplog):
        run()


# --- 3. model files -----------------------------------------------------------------------------------

TREE_FIELDS = ("split_feature", "threshold", "decision_type", "left_child", "right_child", "leaf_value", "num_leaves",
               "num_cat", "cat_boundaries", "cat_threshold", "is_linear")
NUMBERS = ["nan", "-nan", "inf", "-inf", "1e308", "-1e308", "1e-320", "0", "-0", "-1", "1", "2", "52", "53", "54", "63",
           "64", "-2", "-31", "-32", "30", "31", "32", "127", "128", "255", "-129", "2147483647", "2147483648",
           "-2147483649", "4294967296", "9223372036854775808", "1.5", "abc", "", "0x1f"]
HEADERS = {
    "objective": ["binary sigmoid:1", "binary sigmoid:0", "binary sigmoid:-1", "binary sigmoid:nan", "binary sigmoid:inf",
                  "binary", "regression", "regression sqrt", "poisson", "cross_entropy", "lambdarank", "multiclass num_class:3",
                  "custom", "garbage", ""],
    "max_feature_idx": ["0", "51", "53", "-1", "-2", "100", "nan", ""],
    "num_class": ["0", "2", "-1", "x"],
    "num_tree_per_iteration": ["0", "2"],
    "feature_names": ["", "a b c", "tenure_months"],
    "average_output": [""],
    "version": ["v2", "v9", ""],
}


def _split_trees(text: str) -> tuple[list[str], list[list[str]], list[str]]:
    """(header lines, each tree's lines, the rest) of a LightGBM text model."""
    lines = text.split("\n")
    first = next(i for i, line in enumerate(lines) if line.startswith("Tree="))
    end = next(i for i, line in enumerate(lines) if line.startswith("end of trees"))
    trees: list[list[str]] = []
    for line in lines[first:end]:
        if line.startswith("Tree="):
            trees.append([])
        trees[-1].append(line)
    return lines[:first], trees, lines[end:]


@st.composite
def corrupted_model(draw, text: str) -> str:
    """The model text with 1-3 corruptions."""
    for _ in range(draw(st.integers(1, 3))):
        header, trees, rest = _split_trees(text) if "Tree=" in text and "end of trees" in text else ([], [], [])
        kind = draw(st.sampled_from(["field", "field", "field", "header", "no_trees", "drop_tree", "line", "truncate",
                                     "garbage"] if trees else ["truncate", "line", "garbage"]))
        if kind == "field":
            tree = draw(st.sampled_from(trees))
            at = [i for i, line in enumerate(tree) if line.split("=", 1)[0] in TREE_FIELDS]
            if not at:  # an earlier corruption left this tree without fields (the exploring run found it)
                continue
            i = draw(st.sampled_from(at))
            key, _, values = tree[i].partition("=")
            tokens = values.split()
            how = draw(st.sampled_from(["one", "one", "all", "drop", "extra"]))
            new = draw(st.sampled_from(NUMBERS))
            if how == "one" and tokens:
                tokens[draw(st.integers(0, len(tokens) - 1))] = new
            elif how == "all":
                tokens = [new] * len(tokens)
            elif how == "drop" and tokens:
                del tokens[draw(st.integers(0, len(tokens) - 1))]
            else:
                tokens.append(new)
            tree[i] = f"{key}={' '.join(tokens)}"
        elif kind == "header":
            key = draw(st.sampled_from(sorted(HEADERS)))
            line = f"{key}={draw(st.sampled_from(HEADERS[key]))}"
            at = [i for i, h in enumerate(header) if h.startswith(key + "=")]
            if at and draw(st.booleans()):
                header[at[0]] = line
            elif at:
                del header[at[0]]
            else:
                header.insert(2, line)
        elif kind == "no_trees":
            trees = []
        elif kind == "drop_tree":
            del trees[draw(st.integers(0, len(trees) - 1))]
        if kind in ("field", "header", "no_trees", "drop_tree"):
            text = "\n".join(header + [line for tree in trees for line in tree] + rest)
            continue
        lines = text.split("\n")
        if kind == "line":
            i = draw(st.integers(0, len(lines) - 1))
            how = draw(st.sampled_from(["delete", "duplicate", "swap", "blank"]))
            if how == "delete":
                del lines[i]
            elif how == "duplicate":
                lines.insert(i, lines[i])
            elif how == "swap":
                j = draw(st.integers(0, len(lines) - 1))
                lines[i], lines[j] = lines[j], lines[i]
            else:
                lines.insert(i, "")
            text = "\n".join(lines)
        elif kind == "truncate":
            text = text[:draw(st.integers(0, len(text)))]
        else:
            text = draw(st.sampled_from(["", "\n", "tree\n", "{}", "\x00" * 10, "not a model"])) + draw(TEXT)
    return text


def with_field(text: str, tree: int, key: str, index: int, value: str) -> str:
    """``text`` with value ``index`` of ``key=`` in tree ``tree`` replaced by ``value``."""
    header, trees, rest = _split_trees(text)
    for i, line in enumerate(trees[tree]):
        if line.startswith(key + "="):
            tokens = line.split("=", 1)[1].split()
            tokens[index] = value
            trees[tree][i] = f"{key}={' '.join(tokens)}"
    return "\n".join(header + [line for t in trees for line in t] + rest)


@st.composite
def corrupted_schema(draw, text: str) -> str:
    schema = json.loads(text)
    kind = draw(st.sampled_from(["truncate", "json", "drop", "value", "actions", "deep"]))
    if kind == "truncate":
        return text[:draw(st.integers(0, len(text) - 1))]
    if kind == "deep":
        n = draw(st.sampled_from([10, 1_000, 100_000]))
        return "[" * n + "]" * n
    if kind == "json":
        return json.dumps(draw(st.sampled_from([None, 5, "x", [], [1], {}, True, 1.5])))
    if kind == "drop":
        del schema[draw(st.sampled_from(sorted(schema)))]
    elif kind == "value":
        key = draw(st.sampled_from(sorted(schema)))
        schema[key] = draw(st.sampled_from([None, 5, "x", [], {}, list(reversed(schema[key])) if isinstance(schema[key], list)
                                            else schema[key], [*schema[key], "extra"] if isinstance(schema[key], list) else 0]))
    else:
        schema["actions"] = draw(st.sampled_from([None, 5, "abc", [1, 2], [None], {"a": 1}, [[]], True]))
    return json.dumps(schema)


def new_version(registry: ModelRegistry, source: str, model_text: str | None = None, schema_text: str | None = None) -> str:
    """A copy of version ``source`` with its model.txt / schema.json replaced (as given)."""
    version = f"v-fuzz-{time.time_ns()}"
    shutil.copytree(registry.dir / source, registry.dir / version)
    if model_text is not None:
        (registry.dir / version / "model.txt").write_text(model_text, encoding="utf-8", errors="surrogatepass")
    if schema_text is not None:
        (registry.dir / version / "schema.json").write_text(schema_text, encoding="utf-8", errors="surrogatepass")
    return version


def within(seconds: float, fn, *args):
    """``fn(*args)`` in a thread: its result or its exception; fails when it takes longer (a hang)."""
    box: dict = {}

    def target() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # handed back to the caller
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{getattr(fn, '__name__', fn)} did not return within {seconds:.0f} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


def assert_scores_probabilities(model: LoadedModel) -> None:
    """A model that was let through scores like one: probabilities, and the decision scorer equals the walker."""
    rng = np.random.default_rng(7)
    X = rng.normal(0, 50, size=(64, len(FEATURES)))
    X[rng.random(X.shape) < 0.1] = np.nan
    X[:8] = 0.0
    p = model.scorer.predict(X)
    assert np.all(np.isfinite(p)) and np.all((p >= 0) & (p <= 1)), p
    catalog = X[:16, list(ROW_FEATURES)]
    bound = model.scorer.bind(ROW_FEATURES, catalog)
    rows = np.repeat(X[16:17], 16, axis=0)
    rows[:, list(ROW_FEATURES)] = catalog
    np.testing.assert_allclose(bound.predict(X[16], np.arange(16)), model.scorer.predict(rows), rtol=0, atol=1e-12)
    assert all(isinstance(a, str) for a in model.action_levels)


def refused_or_sound(registry: ModelRegistry, version: str) -> bool:
    """Load and promote ``version`` as ``nba models promote`` does: True when it went live (and scores
    like a model), False when it was refused with a ModelRefused saying why; the champion is untouched then."""
    champion = registry.champion()
    try:
        model = within(60, registry.load, version)
    except ModelRefused as exc:
        assert str(exc).strip()
        with pytest.raises(ModelRefused):
            within(60, registry.promote, version)
        assert registry.champion() == champion
        return False
    assert_scores_probabilities(model)
    return True


@pytest.fixture()
def registry(models_dir: Path, tmp_path: Path) -> ModelRegistry:
    """A copy of the trained registry (the session's stays as it is)."""
    shutil.copytree(models_dir, tmp_path / "models")
    return ModelRegistry(tmp_path / "models", SCHEMA)


def test_corrupted_model_files_are_refused_or_sound(registry: ModelRegistry) -> None:
    champion = registry.champion()
    assert champion is not None
    text = (registry.dir / champion / "model.txt").read_text()
    schema = (registry.dir / champion / "schema.json").read_text()
    header, trees, rest = _split_trees(text)

    @fuzz(80)
    @given(st.one_of(corrupted_model(text).map(lambda t: (t, None)), corrupted_schema(schema).map(lambda s: (None, s))))
    @example((text[: len(text) // 2], None))
    @example(("\n".join(header + rest), None))  # no trees
    @example((None, "null"))  # schema.json not an object: TypeError escaped load()
    @example((None, "[" * 100_000 + "]" * 100_000))  # RecursionError escaped load()
    @example((None, schema.replace('"actions": [', '"actions": 5, "was": [', 1)))  # TypeError escaped load()
    @example((with_field(text, 0, "left_child", 3, "0"), None))  # a cycle: load() never returned
    @example((with_field(text, 59, "left_child", 2, "-32"), None))  # leaf 31 of 31: read past the leaf values
    @example((with_field(text, 0, "threshold", 4, "nan"), None))  # walker and decision scorer disagreed
    @example((with_field(text, 0, "threshold", 4, "inf"), None))  # LightGBM writes these: fine
    @example((with_field(text, 0, "leaf_value", 0, "inf"), None))  # propensity 1 or NaN
    @example((with_field(text, 0, "cat_boundaries", -1, "1000"), None))  # categories read past the bitsets (the last boundary: trees differ with the catalog)
    @example((text.replace("objective=binary sigmoid:1", "objective=binary sigmoid:nan"), None))  # NaN scores
    @example((text.replace("objective=binary sigmoid:1", "objective=regression"), None))  # scores not probabilities
    def run(files: tuple[str | None, str | None]) -> None:
        version = new_version(registry, champion, *files)
        try:
            if refused_or_sound(registry, version):
                registry.promote(champion)  # back to the real champion for the next example
        finally:
            shutil.rmtree(registry.dir / version)
        assert registry.champion() == champion

    run()


def experiment_texts() -> st.SearchStrategy[str]:
    """A broken experiment.yaml (its text, as ``how`` for the test below)."""
    valid = ("challenger:\n  version: VERSION\n  mode: split\n  share: 0.2\nexploration:\n  strategy: thompson\n"
             "  share: 0.1\n  period_hours: 24\n  weight: 0.3\n  prior_mean: 0.1\n  prior_strength: 20\n  control: false\n")

    @st.composite
    def mutated(draw) -> str:
        lines = valid.split("\n")
        i = draw(st.integers(0, len(lines) - 1))
        if ":" in lines[i] and draw(st.booleans()):
            key = lines[i].split(":", 1)[0]
            lines[i] = f"{key}: {draw(st.one_of(st.sampled_from(TOKENS), TEXT))}"
        else:
            del lines[i]
        return "\n".join(lines)

    return st.one_of(mutated(), TEXT.map(lambda t: t or "x"),
                     st.sampled_from(["[" * 5_000 + "]" * 5_000, "{" * 50, "\x00", "challenger: 5", "exploration: []",
                                      "challenger: {version: VERSION, share: .nan}", "exploration: {share: .inf}"]))


@pytest.fixture()
def watched_models(redis_url: str, models_dir: Path, tmp_path: Path):
    """A served App on its own copy of the registry; its model watcher polls only when the test says."""
    shutil.copytree(models_dir, tmp_path / "models")
    app = App(Config(redis_url=redis_url, rules_dir=RULES_DIR, models_dir=tmp_path / "models", demo_customers=200,
                     metrics_port=0, rules_watch_seconds=0, events_poll_seconds=0, model_poll_seconds=3600)).start()
    server, port, _ = build_server(app, "127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield app, channel
    channel.close()
    server.stop(0).wait()
    app.close()


def test_corrupted_models_never_replace_the_live_one(watched_models, caplog) -> None:
    """What a running server does when CHAMPION or experiment.yaml names a corrupted version: refuses
    it with a message (``ModelWatcher.last_error``) and keeps deciding with the model it has."""
    app, channel = watched_models
    registry, watcher = app.registry, app.model_watcher
    live = app.model.current.version
    text = (registry.dir / live / "model.txt").read_text()
    schema = (registry.dir / live / "schema.json").read_text()

    def point(version: str, how: str) -> None:
        if how == "champion":
            (registry.dir / "CHAMPION").write_text(version + "\n")
        elif how in ("split", "shadow"):
            (registry.dir / "experiment.yaml").write_text(f"challenger: {{version: {version}, mode: {how}, share: 0.5}}\n")
        else:  # experiment.yaml itself is what is broken
            (registry.dir / "experiment.yaml").write_text(how.replace("VERSION", version), encoding="utf-8",
                                                          errors="surrogatepass")

    @fuzz(40)
    @given(st.one_of(corrupted_model(text).map(lambda t: (t, None)), corrupted_schema(schema).map(lambda s: (None, s))),
           st.one_of(st.sampled_from(["champion", "split", "shadow"]), experiment_texts()))
    @example((with_field(text, 0, "right_child", 0, "0"), None), "champion")
    @example((None, "[]"), "shadow")
    @example((None, None), "challenger: " + "[" * 5_000 + "]" * 5_000)  # RecursionError escaped the watcher
    @example((None, None), "challenger:\n  version: 2026-13-01\n")  # ValueError escaped (the exploring run)
    def run(files: tuple[str | None, str | None], how: str) -> None:
        version = new_version(registry, live, *files)
        try:
            point(version, how)
            went_live = within(60, watcher.check)
            if went_live:
                assert watcher.last_error is None
                for model in app.model.current.models:
                    assert_scores_probabilities(model)
            elif how in ("champion", "split", "shadow"):
                assert watcher.last_error and version in watcher.last_error
                assert app.model.current.version == live and app.model.current.challenger is None
            else:
                assert app.model.current.version == live and (watcher.last_error or app.model.current.challenger is None)
            deciders = {version} if went_live and how == "champion" else {live, version} if went_live else {live}
            assert still_serves(channel).model_version in deciders
        finally:
            (registry.dir / "experiment.yaml").unlink(missing_ok=True)
            point(live, "champion")
            within(60, watcher.check)
            shutil.rmtree(registry.dir / version)
        assert app.model.current.version == live and app.model.current.challenger is None
        assert still_serves(channel).model_version == live

    with no_errors_logged(caplog):
        run()


def test_loading_rule_files_keeps_none_of_them_alive() -> None:
    """Found by the long run of the rule check fuzzing (its process took minutes to exit): yamlsrc's
    one module-level YAML constructor remembered every node it ever built, so each ``nba rules check``
    and each reload of a live server kept its rule files' YAML nodes alive (about 0.4 MB a reload)."""
    import gc

    import yaml

    from engine.authoring.check import prepare

    def nodes() -> int:
        gc.collect()
        return sum(isinstance(o, yaml.Node) for o in gc.get_objects())

    prepare(RULES_DIR).close()
    before = nodes()
    for _ in range(3):
        prepare(RULES_DIR).close()
    assert nodes() <= before


AUTH_EXAMPLE = next(b for b in re.findall(r"```yaml\n(.*?)```", (REPO / "engine" / "deploy" / "README.md").read_text(), re.S)
                    if "callers:" in b)


@st.composite
def mutated_auth(draw) -> str:
    """The operator guide's example auth file with 1-3 line mutations: a value replaced by an odd token, a line
    deleted, duplicated or shifted."""
    lines = AUTH_EXAMPLE.split("\n")
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(lines) - 1))
        kind = draw(st.sampled_from(["value", "delete", "duplicate", "indent"]))
        if kind == "value" and ":" in lines[i]:
            key = lines[i].split(":", 1)[0]
            lines[i] = f"{key}: {draw(st.one_of(st.sampled_from(TOKENS), TEXT))}"
        elif kind == "delete":
            del lines[i]
        elif kind == "duplicate":
            lines.insert(i, lines[i])
        else:
            lines[i] = " " * draw(st.integers(0, 6)) + lines[i].lstrip()
    return "\n".join(lines)


def test_mutated_auth_files_load_or_are_refused_with_a_named_entry(tmp_path: Path) -> None:
    """A broken auth file is a SecurityError naming the file (never another exception: a reload that
    raised would take the serving thread's policy check down)."""
    from engine.serving.security import SecurityError, load_auth

    path = tmp_path / "auth.yaml"

    @fuzz(150)
    @given(mutated_auth())
    @example(AUTH_EXAMPLE.replace("2027-03-01T00:00:00Z", "2027-02-30T00:00:00Z"))  # a date that is none
    @example(AUTH_EXAMPLE.replace("roles: [operations]", "roles: operations"))
    def run(text: str) -> None:
        path.write_text(text, encoding="utf-8")
        try:
            load_auth(path)
        except SecurityError as exc:
            assert str(path) in str(exc)

    run()
