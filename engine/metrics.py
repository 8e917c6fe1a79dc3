"""Prometheus metrics: every stage of a decision is timed; names follow Prometheus conventions."""

from __future__ import annotations

import gc
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Sequence
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

disable_created_metrics()  # the *_created series only add noise to every scrape

# 50 us .. 2.5 s: decisions take well under a millisecond per stage.
LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)

DECIDE_SECONDS = Histogram(
    "nba_decide_duration_seconds", "Decide latency inside the server, by channel.",
    ["channel"], buckets=LATENCY_BUCKETS,
)
GC_PAUSE_SECONDS = Histogram(
    "nba_gc_pause_seconds", "Pauses of the garbage collector in a worker, by generation collected (every "
    "thread of the process waits meanwhile).", ["generation"], buckets=LATENCY_BUCKETS,
)
STAGE_SECONDS = Histogram(
    "nba_decision_stage_duration_seconds",
    "Time spent in each stage of a decision (profile, derive, rules, scoring, arbitration, logging).",
    ["stage"], buckets=LATENCY_BUCKETS,
)
DECISIONS = Counter("nba_decisions_total", "Decisions made, by channel.", ["channel"])
ACTIONS_PRESENTED = Counter(
    "nba_actions_presented_total", "Actions returned in decisions.", ["action", "type", "channel"]
)
FALLBACKS = Counter("nba_fallback_decisions_total", "Decisions answered with the fallback action.", ["channel"])
COLD_STARTS = Counter("nba_cold_start_decisions_total", "Decisions for customers with no stored profile.")
DEGRADED = Counter("nba_degraded_decisions_total", "Decisions made without part of their normal input.", ["cause"])
REDIS_ERRORS = Counter("nba_redis_errors_total", "Redis commands that failed.", ["operation"])
UNREPLICATED = Counter("nba_redis_unreplicated_total", "Writes on a Redis Cluster acknowledged although no replica "
                       "confirmed them in time (a failover of that master now may lose them).", ["operation"])
REDIS_BREAKER = Counter("nba_redis_breaker_total", "Redis circuit breaker: opened (a stall or a refused connection), "
                        "closed (a reply), refused (a command not sent while open).", ["event"])
RULE_FIRINGS = Counter("nba_rule_firings_total", "Rules that fired, by kind (situation, policy, lever).", ["kind", "rule"])
RPCS = Counter("nba_grpc_requests_total", "gRPC calls handled, by method and status code.", ["method", "code"])
RESPONSES = Counter("nba_responses_total", "Responses recorded, by outcome.", ["outcome"])
EVENTS = Counter("nba_events_total", "Events published, by type.", ["type"])
EVENTS_PROCESSED = Counter(
    "nba_events_processed_total",
    "Events ingested by PublishEvent or the ingest stream, by type and result (accepted, duplicate, invalid).",
    ["type", "result", "source"],
)
EVENT_SECONDS = Histogram(
    "nba_event_processing_duration_seconds",
    "Time to process one event: dedupe and history, patterns, triggers, outbound; by source (grpc, stream, timer).",
    ["source"], buckets=LATENCY_BUCKETS,
)
PATTERN_FIRINGS = Counter("nba_event_pattern_firings_total", "Event patterns that matched, by pattern.", ["pattern"])
TRIGGER_CHANGES = Counter("nba_triggers_total", "Triggers raised or cleared by events and responses, by trigger.",
                          ["trigger", "change"])
OUTBOUND = Counter(
    "nba_outbound_actions_total",
    "Outbound actions started by event patterns: sent, or suppressed with the funnel stage that stopped them.",
    ["pattern", "result", "reason"],
)
EVENT_TIMERS = Counter("nba_event_timers_total", "Absence timers handled at their due time, by result (fired, "
                       "resolved).", ["result"])
RULE_RELOADS = Counter("nba_rule_reloads_total", "Rule reload attempts, by result (applied, unchanged, refused).",
                       ["result"])
RULE_RELOAD_ERRORS = Gauge("nba_rule_reload_errors", "Errors and failed rule tests of the last reload attempt "
                           "(0 when it went live or changed nothing).", multiprocess_mode="livemax")
CONTACT_SUPPRESSED = Counter(
    "nba_contact_suppressed_total",
    "Candidate actions not shown: a contact policy (by name), quiet hours, or a used-up daily budget (budget).",
    ["reason"],
)
# Info metrics don't aggregate across worker processes; a 0/1 gauge per version does ("livemax": a
# version is 1 while any live worker serves it).
RULESET_VERSION = Gauge("nba_ruleset_info", "The live ruleset version (1 while served).", ["version"],
                        multiprocess_mode="livemax")
MODEL_VERSION = Gauge("nba_model_info", "The live propensity model version (1 while served).", ["version"],
                      multiprocess_mode="livemax")
CATALOG_SIZE = Gauge("nba_catalog_actions", "Actions in the live catalog.", multiprocess_mode="livemax")
MODEL_RELOADS = Counter("nba_model_reloads_total", "Model set changes (CHAMPION, experiment.yaml), by result.", ["result"])
MODEL_DECISIONS = Counter("nba_model_decisions_total", "Decisions by the model that decided and its role.", ["model", "role"])
INTERACTION_DECISIONS = Counter(
    "nba_interaction_decisions_total",
    "Decide calls by how they were answered: new (a decision), repeat (the interaction's decision for this "
    "placement, returned again) or preview (decided without side effects).",
    ["kind"],
)
RESERVATIONS = Counter(
    "nba_budget_reservations_total",
    "Budget units reserved for on_impression channels that ended without an impression in time: released "
    "(given back), late (the impression came after the release; counted in the contact history, not the budget).",
    ["result"],
)
EXPLORATION = Counter(
    "nba_exploration_decisions_total",
    "Decisions that explored (Thompson sampling), by whether the top action differs from pure exploitation.",
    ["top"],
)

# Campaigns (rules/campaigns/*.yaml), refreshed from Redis every few seconds by every worker (the same
# counters for all: "livemax").
CAMPAIGN_LIVE = Gauge("nba_campaign_live", "1 while the campaign runs (between its start and end), else 0.",
                      ["campaign"], multiprocess_mode="livemax")
CAMPAIGN_SPENT = Gauge("nba_campaign_spent", "Presentations of the campaign's actions so far, all server processes.",
                       ["campaign"], multiprocess_mode="livemax")
CAMPAIGN_BUDGET_LEFT = Gauge("nba_campaign_budget_left", "Presentations left in the campaign's total budget.",
                             ["campaign"], multiprocess_mode="livemax")
CAMPAIGN_PACING = Gauge("nba_campaign_pacing_ratio", "Spend against the even-spend line of the total budget (1: on "
                        "it, above 1: ahead of it).", ["campaign"], multiprocess_mode="livemax")


# The archive writer (engine/store/archive.py): one process writes it (the supervisor, the single process or
# nba archive run), so "livemax" is its value.
ARCHIVE_LAG_ENTRIES = Gauge("nba_archive_lag_entries", "Stream entries not yet archived (over all shards; estimated "
                            "when more than a file's worth waits). Past STREAM_MAXLEN they are trimmed unarchived.",
                            ["stream"], multiprocess_mode="livemax")
ARCHIVE_LAG_SECONDS = Gauge("nba_archive_lag_seconds", "Seconds from the oldest entry not yet archived to the "
                            "stream's head (worst shard).", ["stream"], multiprocess_mode="livemax")
ARCHIVED_ENTRIES = Counter("nba_archived_entries_total", "Stream entries written to the archive.", ["stream"])
ARCHIVE_FILES = Counter("nba_archive_files_total", "Archive files written (one per shard, day and flush).", ["stream"])


def set_version(gauge: Gauge, version: str) -> None:
    """Mark ``version`` as the one served, and every other version this process served as not."""
    for labels in list(gauge._metrics):  # the label values seen so far in this process
        gauge.labels(*labels).set(0)
    gauge.labels(version).set(1)


class Children:
    """Cached ``metric.labels(...)`` children: resolving labels on every decision costs microseconds.
    ``inc`` / ``observe`` go to the child's value objects (the ones prometheus_client itself updates,
    in-process or multiprocess) without its per-call checks: a decision makes about 20 of these calls."""

    def __init__(self, metric) -> None:
        self.metric = metric
        self._children: dict = {}
        self._values: dict = {}

    def __call__(self, *labels: str):
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self.metric.labels(*labels)
        return child

    def inc(self, *labels: str) -> None:
        value = self._values.get(labels)
        if value is None:
            value = self._values[labels] = _fast(self(*labels))
        value.inc(1)

    def observe(self, amount: float, *labels: str) -> None:
        value = self._values.get(labels)
        if value is None:
            value = self._values[labels] = _fast(self(*labels))
        value.observe(amount)


class _FastHistogram:
    """``Histogram.observe`` on one child: the sum and the one bucket (prometheus_client keeps bucket
    counts non-cumulative, the first bound >= the amount)."""

    __slots__ = ("sum", "buckets", "bounds")

    def __init__(self, child: Any) -> None:
        self.sum, self.buckets, self.bounds = child._sum, child._buckets, list(child._upper_bounds)

    def observe(self, amount: float) -> None:
        self.sum.inc(amount)
        self.buckets[bisect_left(self.bounds, amount)].inc(1)


def _fast(child: Any) -> Any:
    """The object to ``inc`` / ``observe`` for ``child``: its value objects when this prometheus_client
    has the ones we know (else the child itself, with its checks)."""
    if isinstance(child, Histogram) and all(hasattr(child, a) for a in ("_sum", "_buckets", "_upper_bounds")):
        return _FastHistogram(child)
    if isinstance(child, Counter) and hasattr(getattr(child, "_value", None), "inc"):
        return child._value
    return child


stage_seconds = Children(STAGE_SECONDS)
decide_seconds = Children(DECIDE_SECONDS)
rpcs = Children(RPCS)
contact_suppressed = Children(CONTACT_SUPPRESSED)
decisions = Children(DECISIONS)
actions_presented = Children(ACTIONS_PRESENTED)
rule_firings = Children(RULE_FIRINGS)
model_decisions = Children(MODEL_DECISIONS)
interaction_decisions = Children(INTERACTION_DECISIONS)
events = Children(EVENTS)
events_processed = Children(EVENTS_PROCESSED)
event_seconds = Children(EVENT_SECONDS)
pattern_firings = Children(PATTERN_FIRINGS)
trigger_changes = Children(TRIGGER_CHANGES)


def observe_decision(channel: str, seconds: float | None, stages: Sequence[tuple[str, float]]) -> None:
    """One decision's stage timings and its total (``seconds``; None: it failed, stages only), in one call."""
    for stage, amount in stages:
        stage_seconds.observe(amount, stage)
    if seconds is not None:
        decide_seconds.observe(seconds, channel)
    if _gc_pauses:
        _record_gc_pauses()


def time_gc() -> None:
    """Time every collection of the garbage collector into ``nba_gc_pause_seconds`` (from now on): the
    pauses are recorded with the next decision's metrics (no thread of their own)."""
    if _gc_timer not in gc.callbacks:
        gc.callbacks.append(_gc_timer)


_gc_started = [0.0]
_gc_generations = [GC_PAUSE_SECONDS.labels(str(g)) for g in range(3)]
# (generation, seconds) of collections not yet in the histogram. The callback runs in whichever thread
# allocated when the collector started, possibly one inside prometheus_client holding its lock (in
# multiprocess mode one non-reentrant lock for every value, held while it builds a new child's key):
# observing there would wait for that lock forever, and every thread touching a metric with it.
_gc_pauses: deque[tuple[int, float]] = deque(maxlen=10_000)


def _gc_timer(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _gc_started[0] = time.perf_counter()
    else:
        _gc_pauses.append((info["generation"], time.perf_counter() - _gc_started[0]))


def _record_gc_pauses() -> None:
    while True:
        try:
            generation, seconds = _gc_pauses.popleft()
        except IndexError:
            return
        _gc_generations[generation].observe(seconds)
