"""The CI check that proto/ stays compatible with the released nba.v1 contract (proto/README.md), and that
the checker catches what breaks clients: each case edits a copy of the proto and compiles it with protoc."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.serving.proto_compat import PROTO_DIR, PROTOS, RELEASED, breaking_changes, descriptor_set, released_set

PROTO = (PROTO_DIR / PROTOS[0]).read_text()


def _changed(tmp_path: Path, *edits: tuple[str, str]) -> list[str]:
    text = PROTO
    for old, new in edits:
        assert text.count(old) == 1, f"the test's anchor {old!r} is not once in {PROTOS[0]}"
        text = text.replace(old, new)
    target = tmp_path / PROTOS[0]
    target.parent.mkdir(parents=True)
    target.write_text(text)
    return breaking_changes(released_set(), descriptor_set(tmp_path))


def test_the_current_contract_is_compatible_with_the_released_one() -> None:
    problems = breaking_changes(released_set(), descriptor_set())
    assert not problems, (f"proto/ breaks the released contract {RELEASED.name} (see proto/README.md):\n"
                          + "\n".join(problems))


def test_the_released_contract_is_committed_and_holds_nba_v1() -> None:
    files = {f.name for f in released_set().file}
    assert "nba/v1/nba.proto" in files


def test_additions_and_reserved_removals_are_compatible(tmp_path: Path) -> None:
    assert _changed(
        tmp_path,
        ("  bool preview = 8;\n", "  bool preview = 8;\n  string locale = 99;\n"),  # a new field
        ("  OUTCOME_IGNORED = 5;\n", "  OUTCOME_IGNORED = 5;\n  OUTCOME_CONVERTED = 6;\n"),  # a new enum value
        ("message ReloadRulesRequest {}", "message ReloadRulesRequest {}\nmessage Extra { string x = 1; }"),
        ("  rpc GetStatus(GetStatusRequest) returns (GetStatusResponse);\n",
         "  rpc GetStatus(GetStatusRequest) returns (GetStatusResponse);\n"
         "  rpc Ping(GetStatusRequest) returns (GetStatusResponse);\n"),  # a new method
        # a removed field with its number and name reserved
        ("  // Free context such as call intent: {\"intent\": \"cancel\"}.\n  map<string, string> context = 4;\n",
         "  reserved 4;\n  reserved \"context\";\n"),
    ) == []


def test_a_renumbered_field_names_message_field_and_numbers(tmp_path: Path) -> None:
    problems = _changed(tmp_path, ("  string touchpoint = 3;\n", "  string touchpoint = 13;\n"))
    assert len(problems) == 1, problems
    assert "nba.v1.DecideRequest.touchpoint" in problems[0] and "3 -> 13" in problems[0], problems


def test_a_field_removed_without_reserving_it_breaks(tmp_path: Path) -> None:
    problems = _changed(tmp_path, ("  bool cold_start = 6;\n", ""))
    assert problems == ["nba.v1.DecideResponse.cold_start = 6: field removed without reserving it; add "
                        "`reserved 6;` and `reserved \"cold_start\";`"]
    # reserving only the number keeps the name free for a new field of another meaning: still a break
    assert _changed(tmp_path / "number-only", ("  bool cold_start = 6;\n", "  reserved 6;\n"))


def test_a_type_change_breaks(tmp_path: Path) -> None:
    problems = _changed(tmp_path, ("  int32 max_actions = 5;\n", "  int64 max_actions = 5;\n"))
    assert problems == ["nba.v1.DecideRequest.max_actions = 5: type changed int32 -> int64"]


def test_a_removed_method_breaks(tmp_path: Path) -> None:
    problems = _changed(tmp_path, ("  rpc PublishEvent(PublishEventRequest) returns (PublishEventResponse);\n", ""))
    assert problems == ["nba.v1.DecisionService.PublishEvent: method removed (deprecate it with "
                        "`option deprecated = true;` instead)"]


@pytest.mark.parametrize(("edits", "expected"), [
    ([("  repeated string reasons = 9;\n", "  string reasons = 9;\n")],
     "nba.v1.RankedAction.reasons = 9: cardinality changed repeated -> singular"),
    ([("  string touchpoint = 3;\n", "  string touch_point = 3;\n")],
     "nba.v1.DecideRequest.touchpoint = 3: renamed to touch_point"),
    ([("    bool clear = 5;  // back to the attribute's default\n  }\n", "  }\n  bool clear = 5;\n")],
     "nba.v1.AttributeValue.clear = 5: oneof membership changed value -> (none)"),
    ([("  map<string, string> attributes = 4;\n  google", "  map<string, int32> attributes = 4;\n  google")],
     "nba.v1.PublishEventRequest.attributes = 4: type changed map<string, string> -> map<string, int32>"),
    ([("  CHANNEL_SMS = 5;\n", "  CHANNEL_SMS = 15;\n")], "nba.v1.Channel.CHANNEL_SMS: enum value number changed 5 -> 15"),
    ([("  CHANNEL_SMS = 5;\n", "")], "nba.v1.Channel.CHANNEL_SMS = 5: enum value removed without reserving it"),
    ([("  CHANNEL_SMS = 5;\n", "  CHANNEL_TEXT = 5;\n")], "nba.v1.Channel.CHANNEL_SMS = 5: renamed to CHANNEL_TEXT"),
    ([("  rpc Decide(DecideRequest) returns (DecideResponse);\n",
       "  rpc Decide(DecideRequest) returns (stream DecideResponse);\n")],
     "nba.v1.DecisionService.Decide: server streaming changed False -> True"),
    ([("  rpc Decide(DecideRequest) returns (DecideResponse);\n",
       "  rpc Decide(DecideRequest) returns (RankedAction);\n")],
     "nba.v1.DecisionService.Decide: response type changed nba.v1.DecideResponse -> nba.v1.RankedAction"),
    ([("message Members {\n  repeated string members = 1;\n}\n", ""),
      ("    Members members = 4;  // a set attribute (products, consent): its members, replacing the stored ones\n",
       "    string members = 4;\n")],
     "nba.v1.Members: message removed"),
])
def test_other_breaking_changes_are_named(tmp_path: Path, edits: list[tuple[str, str]], expected: str) -> None:
    problems = _changed(tmp_path, *edits)
    assert any(p.startswith(expected) for p in problems), problems


def test_a_reserved_number_cannot_be_reused(tmp_path: Path) -> None:
    # A released contract that had reserved DecideRequest field 4 ("context"); the current one uses 4 again.
    released = descriptor_set(_write(tmp_path / "released", PROTO.replace(
        "  map<string, string> context = 4;\n", "  reserved 4;\n  reserved \"context\";\n")))
    problems = breaking_changes(released, descriptor_set())
    assert any("nba.v1.DecideRequest.context = 4: reuses field number 4" in p for p in problems), problems


def _write(root: Path, text: str) -> Path:
    target = root / PROTOS[0]
    target.parent.mkdir(parents=True)
    target.write_text(text)
    return root
