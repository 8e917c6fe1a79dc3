"""Load ``rules/catalog.yaml`` and ``rules/policies.yaml`` into a ``RuleSet``, collecting every error.

Nothing here evaluates text as code: conditions go through our own parser and type checker.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace
from datetime import UTC, date, datetime
from pathlib import Path

from engine.features import FeatureSchema
from engine.rules.checker import IDENT, Scope, situation_refs
from engine.rules.domain import DOMAIN_FILE, load_domain
from engine.rules.errors import RuleError, suggest
from engine.rules.lang import compile_condition
from engine.rules.model import STAGES, Action, GroupRules, Lever, Policy, RuleSet, Situation, Targets
from engine.rules.nodes import Bool, Node
from engine.rules.yamlsrc import Loc, load_yaml

CATALOG_FILE = "catalog.yaml"
POLICIES_FILE = "policies.yaml"
RULE_FILES = (CATALOG_FILE, POLICIES_FILE)
CONSENT_POLICY = "marketing_needs_consent"
CONTACT_FILE = "contact.yaml"  # optional: contact policies, quiet hours, control group (engine/rules/contact.py)
EVENTS_FILE = "events.yaml"  # optional: event types and event patterns (rules/patterns.py)
VERSIONED_FILES = (DOMAIN_FILE, *RULE_FILES, CONTACT_FILE, EVENTS_FILE)
# Which file defines the names another file may refer to, and how its note names them.
DEFINED_IN = {"action": CATALOG_FILE, "group": CATALOG_FILE, "situation": POLICIES_FILE}
DEFINITIONS = {CATALOG_FILE: "actions and groups", POLICIES_FILE: "situations"}

CATALOG_KEYS = {"fallback": True, "actions": True, "groups": False, "description": False}
POLICIES_KEYS = {"triggers": False, "situations": False, "policies": False, "levers": False,
                 "context_weights": False, "description": False}
ACTION_KEYS = {"id": True, "name": True, "type": True, "group": True, "value": True, "channels": True,
               "eligible": False, "applicable": False, "suitable": False, "valid_from": False, "valid_to": False,
               "daily_budget": False, "description": False}
GROUP_KEYS = {"eligible": False, "applicable": False, "suitable": False, "description": False}
SITUATION_KEYS = {"when": True, "description": False}
POLICY_KEYS = {"name": True, "when": True, "blocks": True, "reason": False, "description": False}
LEVER_KEYS = {"name": True, "when": True, "targets": True, "weight": True, "description": False}
TARGET_KEYS = {"types": False, "groups": False, "actions": False}
# The hint for a missing required key: an example of its value. Keys that are plain names (id, name,
# group, owner) have none; a caller passes ``examples`` where a key means something else in its file.
MISSING_EXAMPLES = {
    "fallback": "{default: <action id>}", "type": "upsell", "value": "10", "channels": "{email: {subject: \"...\"}}",
    "when": "'tenure_months >= 12'", "blocks": "{types: [upsell]}", "targets": "{groups: [<group>]}", "weight": "1.5",
    "event_types": "{payment_failed: {attributes: {amount: number}}}", "event": "<event type>",
    "first": "{event: <event type>}", "then": "{event: <event type>}", "after": "{event: <event type>}",
    "missing": "{event: <event type>}", "within": "7d", "ttl": "7d", "trigger": "<trigger name>",
    "action": "<action id>", "channel": "email", "days": "30", "from": '"21:00"', "to": '"08:00"', "share": "0.05",
    "objective": "value", "start": "2030-01-15", "end": "2030-01-31",
}


def read_rule_files(rules_dir: Path) -> dict[str, bytes | None]:
    """The bytes of every versioned rule file (None: missing), read once: a rule set is loaded from
    these and versioned by them, so a file changing meanwhile cannot give it another file's version."""
    from engine.rules.campaigns import CAMPAIGNS_DIR, campaign_files

    files: dict[str, bytes | None] = {}
    names = [*VERSIONED_FILES, *(f"{CAMPAIGNS_DIR}/{p.name}" for p in campaign_files(rules_dir))]
    for name in names:
        path = Path(rules_dir) / name
        try:
            files[name] = path.read_bytes() if path.is_file() else None
        except OSError:
            files[name] = None  # reported by the loader when it reads the file itself
    return files


def rules_version(rules_dir: Path, files: dict[str, bytes | None] | None = None) -> str:
    """``rules-`` + 12 hex of sha256 over the rule files' names and bytes (missing files count as empty)."""
    files = files if files is not None else read_rule_files(rules_dir)
    digest = hashlib.sha256()
    campaigns = sorted(n for n in files if n not in VERSIONED_FILES)  # rules/campaigns/*.yaml
    for name in (*VERSIONED_FILES, *campaigns):
        digest.update(name.encode() + b"\0" + (files.get(name) or b"") + b"\0")
    return "rules-" + digest.hexdigest()[:12]


def load_rules(rules_dir: Path) -> tuple[RuleSet | None, list[RuleError]]:
    """The rule set in ``rules_dir`` (its domain.yaml first) and every error found (the rule set is None
    when there are errors)."""
    loader = _Loader(Path(rules_dir))
    ruleset = loader.load()
    return (None if loader.errors else ruleset), loader.errors


def load_domain_file(rules_dir: Path) -> FeatureSchema:
    """Only the domain declared in ``rules_dir``'s domain.yaml; raises ``RuleErrors`` listing its problems."""
    from engine.rules.errors import RuleErrors

    loader = _Loader(Path(rules_dir))
    schema = load_domain(loader)
    if schema is None:
        raise RuleErrors(loader.errors)
    return schema


class _Loader:
    def __init__(self, rules_dir: Path):
        self.dir = rules_dir
        self.schema = FeatureSchema()  # domain.yaml's, once load() has read it
        self.errors: list[RuleError] = []
        self.files = read_rule_files(rules_dir)
        self.action_ids: dict[str, Loc] = {}  # action id -> where it was first defined
        # files whose definitions could not be read (DEFINED_IN): "did not parse" or "could not be read"
        self.unread: dict[str, str] = {}
        self.unchecked: dict[str, int] = {}  # such a file -> references to its names left unchecked

    def yaml(self, name: str) -> Loc | None:
        """The tree of rule file ``name`` as read when loading started (errors go to ``errors``)."""
        path = self.dir / name
        tree, _source, errors = load_yaml(path, str(path), self.files.get(name))
        self.errors.extend(errors)
        if tree is None:
            self.unread[name] = "did not parse"
        return tree

    def has(self, name: str) -> bool:
        return self.files.get(name) is not None

    # --- small validators -------------------------------------------------------------------------
    def err(self, error: RuleError) -> None:
        self.errors.append(error)

    def ref_err(self, kind: str, error: RuleError) -> None:
        """An error about an unknown name of ``kind`` (DEFINED_IN). When the file defining such names
        could not be read every name would look unknown, so it is only counted for that file's note."""
        defined_in = DEFINED_IN[kind]
        if defined_in in self.unread:
            self.unchecked[defined_in] = self.unchecked.get(defined_in, 0) + 1
        else:
            self.err(error)

    def note_unchecked(self) -> None:
        """Add to the first error of each unreadable file how many references to it were not checked."""
        for name, count in self.unchecked.items():
            path = str(self.dir / name)
            first = min((i for i, e in enumerate(self.errors) if e.file == path),
                        key=lambda i: (self.errors[i].line, self.errors[i].column), default=None)
            if first is not None:
                self.errors[first] = replace(self.errors[first], note=f"{name} {self.unread[name]}: {count} "
                                             f"reference(s) to its {DEFINITIONS[name]} not checked")

    def mapping(self, loc: Loc | None, what: str) -> dict[str, Loc] | None:
        if loc is None:
            return None
        if not loc.is_map:
            self.err(loc.error(f"expected {what} (a mapping of key: value)"))
            return None
        return loc.value

    def sequence(self, loc: Loc, what: str) -> list[Loc]:
        if not loc.is_seq:
            self.err(loc.error(f"expected {what} (a list of '- ...' items)"))
            return []
        return loc.value

    def keys(self, loc: Loc | None, allowed: dict[str, bool], what: str,
             examples: dict[str, str] | None = None) -> dict[str, Loc] | None:
        """The mapping at ``loc`` with unknown and missing required keys reported (None: not a mapping).
        A missing required key is only reported: callers check ``key in items`` before using it."""
        items = self.mapping(loc, what)
        if items is None:
            return None
        assert loc is not None
        for key, value in items.items():
            if key not in allowed:
                hint = suggest(key, allowed) or "allowed: " + ", ".join(allowed)
                self.err(value.key_error(f'unknown key "{key}" in {what}', hint))
        for key, required in allowed.items():
            if required and key not in items:
                example = (examples or {}).get(key) or MISSING_EXAMPLES.get(key)
                self.err(loc.error(f'{what} is missing "{key}"', f"add it, e.g. {key}: {example}" if example else ""))
        return items

    def text(self, loc: Loc | None, what: str, default: str = "") -> str:
        if loc is None:
            return default
        if not isinstance(loc.value, str) or not loc.is_scalar:
            self.err(loc.error(f"expected text for {what}", "put it in quotes"))
            return default
        return loc.value

    def ident(self, loc: Loc | None, what: str) -> str:
        value = self.text(loc, what)
        if loc is not None and value and not IDENT.match(value):
            self.err(loc.error(f'{what} "{value}" must be lower case letters, digits and _, starting with a letter'))
        return value

    def number(self, loc: Loc | None, what: str, *, minimum: float | None = None, positive: bool = False):
        if loc is None:
            return None
        value = loc.value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.err(loc.error(f"expected a number for {what}"))
            return None
        if not math.isfinite(value):  # .inf / .nan: int() of it raises, and no limit or weight means it
            self.err(loc.error(f"expected a number for {what}", "a finite number, not .inf or .nan"))
            return None
        if positive and value <= 0:
            self.err(loc.error(f"{what} must be greater than 0"))
            return None
        if minimum is not None and value < minimum:
            self.err(loc.error(f"{what} must not be negative" if minimum == 0 else f"{what} must be at least {minimum}"))
            return None
        return value

    def day(self, loc: Loc | None, what: str) -> date | None:
        if loc is None:
            return None
        value = loc.value
        if isinstance(value, datetime):
            return value.date()
        if isinstance(value, date):
            return value
        if isinstance(value, str):
            try:
                return date.fromisoformat(value)
            except ValueError:
                pass
        self.err(loc.error(f"expected a date for {what}", "write it as YYYY-MM-DD, e.g. 2026-01-31"))
        return None

    def names(self, loc: Loc | None, what: str) -> list[tuple[str, Loc]]:
        if loc is None:
            return []
        items = [loc] if loc.is_scalar else self.sequence(loc, what)
        out = []
        for item in items:
            value = self.text(item, what)
            if value:
                out.append((value, item))
        return out

    def condition(self, loc: Loc | None, scope: Scope, what: str) -> Node | None:
        if loc is None:
            return None
        if isinstance(loc.value, bool):
            return Bool(loc.value)
        if not isinstance(loc.value, str) or not loc.is_scalar:
            self.err(loc.error(f"expected a condition (text) for {what}", "e.g. 'tenure_months >= 12'"))
            return None
        tree, errors = compile_condition(loc.value, scope)
        for e in errors:
            error = loc.error_at(e.pos, e.message, e.hint)
            if e.refers:
                self.ref_err(e.refers, error)
            else:
                self.err(error)
        return tree

    # --- files ------------------------------------------------------------------------------------
    def load(self) -> RuleSet | None:
        ruleset = self.load_all()
        self.note_unchecked()
        return ruleset

    def load_all(self) -> RuleSet | None:
        schema = load_domain(self)
        if schema is None:  # nothing else can be checked without the data model
            return None
        self.schema = schema
        trees = {}
        for name in RULE_FILES:
            trees[name] = self.yaml(name)
        policies_tree, catalog_tree = trees[POLICIES_FILE], trees[CATALOG_FILE]
        policies_top = self.keys(policies_tree, POLICIES_KEYS, POLICIES_FILE) if policies_tree else {}
        catalog_top = self.keys(catalog_tree, CATALOG_KEYS, CATALOG_FILE) if catalog_tree else {}
        for name, top in ((POLICIES_FILE, policies_top), (CATALOG_FILE, catalog_top)):
            if top is None:
                self.unread.setdefault(name, "could not be read")
        if catalog_top and "actions" in catalog_top and not catalog_top["actions"].is_seq:
            self.unread.setdefault(CATALOG_FILE, "could not be read")
        policies_top = policies_top or {}
        catalog_top = catalog_top or {}

        triggers = self.load_triggers(policies_top.get("triggers"))
        situation_locs = self.mapping(policies_top.get("situations"), "situations") or {}
        scope = Scope(self.schema, situations=set(situation_locs), triggers=triggers)
        situations = self.load_situations(situation_locs, scope)
        actions = self.load_actions(catalog_top.get("actions"), scope)
        from engine.rules.campaigns import load_campaigns

        campaigns, actions = load_campaigns(self, scope, actions)
        groups = self.load_groups(catalog_top.get("groups"), scope, actions)
        fallback = self.load_fallback(catalog_top.get("fallback"), actions)
        policies = self.load_policies(policies_top.get("policies"), scope, actions)
        levers = self.load_levers(policies_top.get("levers"), scope, actions)
        weights = self.load_context_weights(policies_top.get("context_weights"))
        from engine.rules.contact import load_contact

        contact = load_contact(self, self.dir, actions)
        from engine.rules.patterns import load_events

        events = load_events(self, self.dir, actions, triggers)
        return RuleSet(
            version=rules_version(self.dir, self.files),
            loaded_at=datetime.now(UTC),
            actions=tuple(actions),
            fallback=fallback,
            situations=situations,
            policies=tuple(policies),
            levers=tuple(levers),
            context_weights=weights,
            triggers=tuple(sorted(triggers)) if triggers is not None else None,
            files=tuple(str(self.dir / n) for n in RULE_FILES),
            groups=groups,
            contact=contact,
            events=events,
            campaigns=campaigns,
            schema=self.schema,
        )

    def load_triggers(self, loc: Loc | None) -> set[str] | None:
        if loc is None:
            return None
        found: set[str] = set()
        for name, item in self.names(loc, "triggers"):
            if not IDENT.match(name):
                self.err(item.error(f'trigger name "{name}" must be lower case letters, digits and _'))
            elif name in found:
                self.err(item.error(f'trigger "{name}" is declared twice'))
            found.add(name)
        return found

    # --- situations -------------------------------------------------------------------------------
    def load_situations(self, locs: dict[str, Loc], scope: Scope) -> dict[str, Situation]:
        reserved = scope.reserved()
        situations: dict[str, Situation] = {}
        when_locs: dict[str, Loc] = {}
        for name, loc in locs.items():
            if not IDENT.match(name):
                self.err(loc.key_error(f'situation name "{name}" must be lower case letters, digits and _'))
            if name in reserved:
                self.err(loc.key_error(f'situation name "{name}" is already a feature or built-in name', "choose another name"))
            if loc.is_scalar and isinstance(loc.value, str):
                when_loc, description = loc, ""  # shorthand: name: 'condition'
            else:
                items = self.keys(loc, SITUATION_KEYS, f'situation "{name}"')
                if items is None or "when" not in items:
                    continue
                when_loc, description = items["when"], self.text(items.get("description"), "description")
            tree = self.condition(when_loc, scope, f'situation "{name}"')
            if tree is not None:
                situations[name] = Situation(name, tree, str(when_loc.value), description, loc.where())
                when_locs[name] = when_loc
        self.check_cycles(situations, when_locs)
        return situations

    def check_cycles(self, situations: dict[str, Situation], when_locs: dict[str, Loc]) -> None:
        state: dict[str, int] = {}  # 1 visiting, 2 done
        reported: set[frozenset[str]] = set()

        def visit(name: str, path: list[str]) -> None:
            state[name] = 1
            for ref in situation_refs(situations[name].when):
                if ref.name not in situations:
                    continue
                if state.get(ref.name) == 1:
                    cycle = path[path.index(ref.name):] + [ref.name] if ref.name in path else [name, ref.name]
                    key = frozenset(cycle)
                    if key not in reported:
                        reported.add(key)
                        self.err(when_locs[name].error_at(
                            ref.pos, f'situation "{ref.name}" depends on itself: ' + " -> ".join(cycle),
                            "situations may use other situations, but not in a circle"))
                elif ref.name not in state:
                    visit(ref.name, path + [ref.name])
            state[name] = 2

        for name in situations:
            if name not in state:
                visit(name, [name])

    # --- catalog ----------------------------------------------------------------------------------
    def load_actions(self, loc: Loc | None, scope: Scope) -> list[Action]:
        if loc is None:
            return []
        return self.action_items(self.sequence(loc, "actions"), scope)

    def action_items(self, items: list[Loc], scope: Scope) -> list[Action]:
        """Actions from their YAML items (the catalog's, or a campaign's own); ids are unique across both."""
        actions: list[Action] = []
        seen = self.action_ids
        for item in items:
            fields = self.keys(item, ACTION_KEYS, "action")
            if fields is None:
                continue
            action_id = self.ident(fields.get("id"), "action id")
            if action_id in seen:
                prev = seen[action_id]
                self.err(fields["id"].error(f'duplicate action id "{action_id}"',
                                            f"first defined at line {prev.node.start_mark.line + 1}"
                                            if prev.source is item.source else f"first defined at {prev.where()}"))
            elif action_id:
                seen[action_id] = fields["id"]
            what = f'action "{action_id or "?"}"'
            name = self.text(fields.get("name"), f"{what} name")
            kind = self.text(fields.get("type"), f"{what} type")
            types = self.schema.type_names
            if kind and kind not in types:
                hint = suggest(kind, types) or "types: " + ", ".join(types)
                self.err(fields["type"].error(f'unknown action type "{kind}"', hint))
            group = self.ident(fields.get("group"), f"{what} group")
            value = self.number(fields.get("value"), f"{what} value", minimum=0)
            channels = self.load_channels(fields.get("channels"), what)
            stages = self.stages(fields, scope, what)
            valid_from = self.day(fields.get("valid_from"), "valid_from")
            valid_to = self.day(fields.get("valid_to"), "valid_to")
            if valid_from and valid_to and valid_to < valid_from:
                self.err(fields["valid_to"].error("valid_to is before valid_from"))
            budget = self.number(fields.get("daily_budget"), f"{what} daily_budget", minimum=0)
            if budget is not None and not float(budget).is_integer():
                self.err(fields["daily_budget"].error("daily_budget must be a whole number"))
            actions.append(Action(
                id=action_id, name=name, type=kind, group=group, value=float(value or 0.0),
                channels=channels, **stages,
                valid_from=valid_from, valid_to=valid_to,
                daily_budget=int(budget) if budget is not None else None,
                description=self.text(fields.get("description"), "description"),
                source=item.where(), service=kind in self.schema.service_types,
                quiet_exempt=kind in self.schema.quiet_exempt_types,
            ))
        return actions

    def stages(self, fields: dict[str, Loc], scope: Scope, what: str) -> dict:
        """The eligible / applicable / suitable conditions (and texts) of an action or group."""
        out: dict = {}
        for stage in STAGES:
            loc = fields.get(stage)
            condition = self.condition(loc, scope, f"{what} {stage}")
            if isinstance(condition, Bool) and condition.value:
                condition = None  # "eligible: true" is the same as no condition
            out[stage] = condition
            out[f"{stage}_text"] = str(loc.value) if loc is not None else ""
        return out

    def load_groups(self, loc: Loc | None, scope: Scope, actions: list[Action]) -> dict[str, GroupRules]:
        known = {a.group for a in actions}
        groups: dict[str, GroupRules] = {}
        for name, item in (self.mapping(loc, "groups") or {}).items():
            if name not in known:
                hint = suggest(name, known) or "a group gets conditions only when some action uses it"
                self.ref_err("group", item.key_error(f'no action is in group "{name}"', hint))
                continue
            fields = self.keys(item, GROUP_KEYS, f'group "{name}"')
            if fields is None:
                continue
            groups[name] = GroupRules(name, **self.stages(fields, scope, f'group "{name}"'),
                                      description=self.text(fields.get("description"), "description"),
                                      source=item.where())
        return groups

    def load_channels(self, loc: Loc | None, what: str) -> dict[str, dict[str, str]]:
        items = self.mapping(loc, f"channels of {what}")
        if items is None:
            return {}
        assert loc is not None
        if not items:
            self.err(loc.error(f"{what} has no channels", "list at least one channel with its treatment"))
        out: dict[str, dict[str, str]] = {}
        for channel, treatment_loc in items.items():
            if channel not in self.schema.channel_names:
                hint = suggest(channel, self.schema.channel_names) or "channels: " + ", ".join(self.schema.channel_names)
                self.err(treatment_loc.key_error(f'unknown channel "{channel}"', hint))
                continue
            treatment = self.mapping(treatment_loc, f"the {channel} treatment of {what}")
            if treatment is None:
                continue
            fields: dict[str, str] = {}
            for key, text_loc in treatment.items():
                if not isinstance(text_loc.value, str) or not text_loc.is_scalar:
                    self.err(text_loc.error(f'treatment field "{key}" must be text', "put it in quotes"))
                    continue
                fields[key] = text_loc.value
            out[channel] = fields
        return out

    def load_fallback(self, loc: Loc | None, actions: list[Action]) -> dict[str, str]:
        items = self.mapping(loc, "fallback")
        if items is None:
            return {}
        assert loc is not None
        by_id = {a.id: a for a in actions}
        fallback: dict[str, str] = {}
        for channel, id_loc in items.items():
            if channel != "default" and channel not in self.schema.channel_names:
                hint = suggest(channel, [*self.schema.channel_names, "default"]) or "use a channel name or default"
                self.err(id_loc.key_error(f'unknown channel "{channel}" in fallback', hint))
                continue
            action_id = self.text(id_loc, "fallback action")
            if action_id not in by_id:
                hint = suggest(action_id, by_id) if action_id else ""
                self.ref_err("action", id_loc.error(f'fallback names an unknown action "{action_id}"', hint))
                continue
            if channel != "default" and not by_id[action_id].offered_on(channel):
                self.err(id_loc.error(f'fallback action "{action_id}" has no {channel} treatment',
                                      f"add a {channel} treatment to it or pick another action"))
            fallback[channel] = action_id
        default = fallback.get("default")
        uncovered = [c for c in self.schema.channel_names if c not in items]
        if uncovered and "default" not in items:
            self.err(loc.error("no fallback for " + ", ".join(uncovered), 'add "default: <action id>"'))
        elif uncovered and default is not None:
            missing = [c for c in uncovered if not by_id[default].offered_on(c)]
            if missing:
                self.err(items["default"].error(
                    f'default fallback "{default}" has no treatment for ' + ", ".join(missing),
                    "add a fallback per channel (channel: <action id>) or those treatments to the action"))
        return fallback

    # --- policies and levers ----------------------------------------------------------------------
    def load_targets(self, loc: Loc | None, what: str, actions: list[Action]) -> Targets:
        items = self.keys(loc, TARGET_KEYS, what) if loc is not None else None
        if items is None:
            return Targets()
        assert loc is not None
        groups = {a.group for a in actions}
        ids = {a.id for a in actions}
        found: dict[str, set[str]] = {"types": set(), "groups": set(), "actions": set()}
        known = {"types": set(self.schema.type_names), "groups": groups, "actions": ids}
        singular = {"types": "action type", "groups": "group", "actions": "action"}
        for key in TARGET_KEYS:
            for value, item in self.names(items.get(key), f"{what} {key}"):
                if value not in known[key]:
                    hint = suggest(value, known[key]) or ""
                    error = item.error(f'unknown {singular[key]} "{value}" in {what}', hint)
                    if key == "types":
                        self.err(error)
                    else:
                        self.ref_err(singular[key], error)
                found[key].add(value)
        if not any(found.values()) and not any(items.get(k) is not None for k in TARGET_KEYS):
            self.err(loc.error(f"{what} names no types, groups or actions"))
        return Targets(frozenset(found["types"]), frozenset(found["groups"]), frozenset(found["actions"]))

    def load_named_list(self, loc: Loc | None, what: str) -> list[tuple[str, dict[str, Loc], Loc]]:
        """Items of a list of mappings that each have a unique ``name``."""
        if loc is None:
            return []
        out, seen = [], set()
        keys = POLICY_KEYS if what == "policy" else LEVER_KEYS
        for item in self.sequence(loc, f"{what} list"):
            fields = self.keys(item, keys, what)
            if fields is None:
                continue
            name = self.ident(fields.get("name"), f"{what} name")
            if name and name in seen:  # "": no name, reported by keys()
                self.err(fields["name"].error(f'duplicate {what} name "{name}"'))
            seen.add(name)
            out.append((name, fields, item))
        return out

    def load_policies(self, loc: Loc | None, scope: Scope, actions: list[Action]) -> list[Policy]:
        policies = [self.consent_policy(scope)]
        for name, fields, item in self.load_named_list(loc, "policy"):
            what = f'policy "{name}"'
            if name == CONSENT_POLICY:
                self.err(fields["name"].error(f'policy "{name}" is built in', "domain.yaml's action_types say which "
                                              "types need consent; choose another name for this policy"))
                continue
            when = self.condition(fields.get("when"), scope, what)
            blocks = self.load_targets(fields.get("blocks"), f"{what} blocks", actions)
            reason = self.text(fields.get("reason"), f"{what} reason") or f"blocked by policy {name}"
            if when is not None:
                policies.append(Policy(name, when, str(fields["when"].value), blocks, reason,
                                       self.text(fields.get("description"), "description"), item.where()))
        return policies

    def consent_policy(self, scope: Scope) -> Policy:
        """The built-in policy: no action of a type that needs consent goes out on a channel the customer
        has not consented to. Types are held to it unless domain.yaml exempts them (``needs_consent: false``)."""
        when, errors = compile_condition("not has_consent", scope)
        assert when is not None and not errors
        types = frozenset(t.name for t in self.schema.action_types if t.needs_consent)
        return Policy(CONSENT_POLICY, when, "not has_consent", Targets(types=types),
                      "No marketing consent for this channel; service messages only",
                      "built in: every action type needs consent unless domain.yaml says needs_consent: false",
                      str(self.dir / DOMAIN_FILE) + ":1:1")

    def load_levers(self, loc: Loc | None, scope: Scope, actions: list[Action]) -> list[Lever]:
        levers = []
        for name, fields, item in self.load_named_list(loc, "lever"):
            what = f'lever "{name}"'
            when = self.condition(fields.get("when"), scope, what)
            targets = self.load_targets(fields.get("targets"), f"{what} targets", actions)
            weight = self.number(fields.get("weight"), f"{what} weight", positive=True)
            if when is not None and weight is not None:
                levers.append(Lever(name, when, str(fields["when"].value), targets, float(weight),
                                    self.text(fields.get("description"), "description"), item.where()))
        return levers

    def load_context_weights(self, loc: Loc | None) -> dict[str, dict[str, float]]:
        items = self.mapping(loc, "context_weights")
        if items is None:
            return {}
        out: dict[str, dict[str, float]] = {}
        for channel, per_type in items.items():
            if channel not in self.schema.channel_names:
                hint = suggest(channel, self.schema.channel_names) or "channels: " + ", ".join(self.schema.channel_names)
                self.err(per_type.key_error(f'unknown channel "{channel}" in context_weights', hint))
                continue
            weights = self.mapping(per_type, f"context weights for {channel}") or {}
            out[channel] = {}
            for kind, weight_loc in weights.items():
                if kind not in self.schema.type_names:
                    hint = suggest(kind, self.schema.type_names) or "types: " + ", ".join(self.schema.type_names)
                    self.err(weight_loc.key_error(f'unknown action type "{kind}" in context_weights', hint))
                    continue
                weight = self.number(weight_loc, f"context weight {channel}.{kind}", positive=True)
                if weight is not None:
                    out[channel][kind] = float(weight)
        return out


