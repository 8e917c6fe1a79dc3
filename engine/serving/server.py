"""The thin gRPC layer: maps messages to the decision core and errors to status codes."""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from contextlib import AbstractContextManager
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import redis
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from engine import __version__, metrics
from engine.api.nba.v1 import nba_pb2 as pb
from engine.api.nba.v1 import nba_pb2_grpc as pb_grpc
from engine.decision.funnel import Decision, redis_until
from engine.decision.request import DecideInput, InvalidRequest, timestamp_seconds
from engine.decision.responses import NotFound, OutcomeConflict
from engine.serving import error_details
from engine.serving.admission import Admission
from engine.serving.privacy import check_customer_id
from engine.serving.privacy_jobs import JobNotFound, PrivacyJobs
from engine.serving.reflection import enable_reflection
from engine.serving.security import (
    MAX_MESSAGE_BYTES,
    AuthPolicy,
    ServerCertificates,
    caller_interceptor,
    current_caller,
)
from engine.serving.tracing import TracingInterceptor
from engine.store.profiles import redis_client, redis_deadline
from engine.store.updates import InvalidAttribute, ProfileExists, apply_update, check_update

if TYPE_CHECKING:
    from engine.serving.app import App

log = logging.getLogger(__name__)

CHANNEL_FROM_PB = {
    pb.CHANNEL_CALL_CENTER: "call_center",
    pb.CHANNEL_WEB: "web",
    pb.CHANNEL_MOBILE_APP: "mobile_app",
    pb.CHANNEL_EMAIL: "email",
    pb.CHANNEL_SMS: "sms",
    pb.CHANNEL_BRANCH: "branch",
    pb.CHANNEL_POINT_OF_SALE: "pos",
}
CHANNEL_TO_PB = {v: k for k, v in CHANNEL_FROM_PB.items()}
TYPE_TO_PB = {
    "upsell": pb.ACTION_TYPE_UP_SELL,
    "cross_sell": pb.ACTION_TYPE_CROSS_SELL,
    "bundle": pb.ACTION_TYPE_BUNDLE,
    "retention": pb.ACTION_TYPE_RETENTION,
    "acquisition": pb.ACTION_TYPE_ACQUISITION,
    "service": pb.ACTION_TYPE_SERVICE,
}
OUTCOME_NAMES = {
    pb.OUTCOME_IMPRESSION: "impression",
    pb.OUTCOME_CLICKED: "clicked",
    pb.OUTCOME_ACCEPTED: "accepted",
    pb.OUTCOME_REJECTED: "rejected",
    pb.OUTCOME_IGNORED: "ignored",
}


# In flight on one worker before load shedding (Config.max_in_flight). A decision costs 1-2 ms of one core
# and the calls of a worker share one GIL, so each admitted call makes every other one later, and
# gRPC's own polling thread, which admits and sheds, waits for the GIL too; with Redis stalled, the
# circuit breaker (engine/store/breaker.py) frees the threads within about 50 ms. Measured in
# BENCHMARKS.md ("Issue 14: fault drills"): 16 sheds a 3x burst with fewer missed deadlines than 32 or 64.
MAX_IN_FLIGHT = 16
_JOBS_LOCK = threading.Lock()  # one privacy job runner per App
MAX_CONNECTION_AGE_MS = 30_000
MAX_CONNECTION_IDLE_MS = 15_000
# calls at once on one HTTP/2 connection (grpc's default: no limit). Admission bounds the work per worker;
# this bounds what one connection can make grpc track. Calls refused without their request being read
# keep their stream a little longer, so a busy connection needs room well above the lanes (at 100, a
# connection flooding refused calls saw a few of its calls refused with REFUSED_STREAM).
MAX_STREAMS_PER_CONNECTION = 256


def _archive_of(config: object) -> Path | str | None:
    """The archive the privacy jobs erase and export with the streams (``Config.archive_root``)."""
    root = getattr(config, "archive_root", None)
    return root() if callable(root) else None


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def decision_to_pb(d: Decision) -> pb.DecideResponse:
    # filled in place: a RankedAction built apart and then passed in is built twice (copied into the list)
    channel = CHANNEL_TO_PB.get(d.channel, pb.CHANNEL_UNSPECIFIED)
    reply = pb.DecideResponse(decision_id=d.decision_id, ruleset_version=d.ruleset_version,
                              model_version=d.model_version, degraded=d.degraded, cold_start=d.cold_start,
                              situations=d.situations, control_group=d.control, repeat=d.repeat, preview=d.preview)
    add = reply.actions.add
    for a in d.actions:
        kind = TYPE_TO_PB.get(a.type, pb.ACTION_TYPE_UNSPECIFIED)
        treatment = add(action_id=a.action_id, name=a.name, type=kind, type_name=a.type, group=a.group,
                        propensity=a.propensity, value=a.value, priority=a.priority, reasons=a.reasons,
                        rank=a.rank, campaign=a.campaign).treatment
        treatment.channel = channel
        treatment.channel_name = d.channel
        treatment.content.update(a.treatment)
    if d.funnel:
        entry = reply.funnel.add
        for f in d.funnel:
            entry(action_id=f.action_id, stage=f.stage, detail=f.detail, propensity=f.propensity, priority=f.priority)
    reply.decided_at.FromNanoseconds(int(d.decided_at * 1e9))
    return reply


def _counted_as(method: str) -> Callable[[Callable], Callable]:
    """Counts calls by status code; InvalidRequest becomes INVALID_ARGUMENT, Redis down UNAVAILABLE; every
    error carries google.rpc details (``error_details``)."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(self, request, context: grpc.ServicerContext):
            field, retry_after = "", None
            try:
                if isinstance(request, Undecodable):
                    bad = InvalidRequest("request", f"not a valid {request.method} request (bytes that do not parse, "
                                                    f"e.g. a string field that is not UTF-8): {request.error}")
                    bad.reason = error_details.MALFORMED_REQUEST
                    raise bad
                reply = fn(self, request, context)
            except InvalidRequest as exc:
                code, message, field = grpc.StatusCode.INVALID_ARGUMENT, str(exc), exc.field
                reason = error_details.reason_of(exc, error_details.INVALID_FIELD)
            except NotFound as exc:
                code, message, field = grpc.StatusCode.NOT_FOUND, str(exc), exc.field
                reason = error_details.reason_of(exc, error_details.not_found_reason(exc.field))
            except ProfileExists as exc:
                code, message = grpc.StatusCode.FAILED_PRECONDITION, str(exc)
                reason = error_details.reason_of(exc, error_details.PROFILE_EXISTS)
            except OutcomeConflict as exc:
                code, message, field = grpc.StatusCode.FAILED_PRECONDITION, str(exc), exc.field
                reason = error_details.reason_of(exc)
            except redis.exceptions.RedisError as exc:
                metrics.REDIS_ERRORS.labels(method).inc()
                code, message = grpc.StatusCode.UNAVAILABLE, f"profile store unavailable: {exc}"
                reason, retry_after = error_details.PROFILE_STORE_UNAVAILABLE, error_details.UNAVAILABLE_RETRY_SECONDS
            except Exception:
                log.exception("%s failed", method)
                code, message, reason = grpc.StatusCode.INTERNAL, f"{method} failed; see the server log", error_details.INTERNAL
            else:
                metrics.rpcs.inc(method, "OK")
                return reply
            metrics.RPCS.labels(method, code.name).inc()
            error_details.abort(context, code, message, reason, field=field, metadata={"method": method},
                                retry_after=retry_after)

        return wrapper

    return decorate


def _deadline(context: grpc.ServicerContext) -> float:
    """The caller's deadline as a ``time.monotonic()`` instant (0: the caller set none)."""
    left = context.time_remaining()
    return time.monotonic() + left if left is not None else 0.0


def _redis_until(context: grpc.ServicerContext) -> AbstractContextManager[None]:
    """Redis replies awaited until the caller's deadline less the time to answer (as Decide does)."""
    return redis_deadline(redis_until(_deadline(context)))


def _seconds(request) -> float | None:
    """The request's ``timestamp`` in seconds (None without one); INVALID_ARGUMENT when it is no valid
    Timestamp (seconds outside years 1-9999, nanos outside 0-999,999,999)."""
    if not request.HasField("timestamp"):
        return None
    return timestamp_seconds(request.timestamp.seconds, request.timestamp.nanos)


class Undecodable:
    """A request whose bytes do not parse (a string field that is not UTF-8, a truncated message), as
    ``DecodeGuard`` hands it to our methods: ``_counted_as`` answers INVALID_ARGUMENT."""

    def __init__(self, method: str, error: Exception) -> None:
        self.method, self.error = method, error


class DecodeGuard(grpc.ServerInterceptor):
    """Our methods get an ``Undecodable`` for a request that does not parse, where grpc itself would
    abort the call with INTERNAL ("Exception deserializing request!")."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or handler.request_deserializer is None or not method.startswith("/nba."):
            return handler
        parse = handler.request_deserializer

        def lenient(data: bytes):
            try:
                return parse(data)
            except Exception as exc:  # protobuf's DecodeError, or whatever else hostile bytes raise
                return Undecodable(method.rsplit("/", 1)[-1], exc)

        return handler._replace(request_deserializer=lenient)


def _require(value: str, name: str) -> str:
    if not value or not value.strip():
        raise InvalidRequest(name, "must not be empty")
    if len(value) > 256:
        raise InvalidRequest(name, "at most 256 characters")
    return value


class DecisionServicer(pb_grpc.DecisionServiceServicer):
    def __init__(self, app: App) -> None:
        self.app = app

    def _channel(self, request: pb.DecideRequest) -> str:
        """The declared channel a Decide names: ``channel_name``, or the ``channel`` enum's name."""
        declared = self.app.rules.current.schema.channel_names
        by_enum = CHANNEL_FROM_PB.get(request.channel)
        if request.channel_name:
            if request.channel_name not in declared:
                raise InvalidRequest("channel_name", f"unknown channel {request.channel_name[:64]!r}; declared "
                                                     "channels: " + ", ".join(declared))
            if request.channel and by_enum != request.channel_name:
                raise InvalidRequest("channel_name", f"{request.channel_name!r} disagrees with channel "
                                                     f"{pb.Channel.Name(request.channel) if by_enum else request.channel}")
            return request.channel_name
        if by_enum is None:
            raise InvalidRequest("channel", "set channel_name (declared channels: " + ", ".join(declared)
                                 + ") or channel (" + ", ".join(pb.Channel.keys()[1:]) + ")")
        return by_enum

    @_counted_as("Decide")
    def Decide(self, request: pb.DecideRequest, context: grpc.ServicerContext) -> pb.DecideResponse:
        decision = self.app.engine.decide(DecideInput(
            customer_id=request.customer_id,
            channel=self._channel(request),
            touchpoint=request.touchpoint,
            context=dict(request.context),
            max_actions=request.max_actions,
            explain=request.explain,
            interaction_id=request.interaction_id,
            preview=request.preview,
            deadline=_deadline(context),
        ))
        return decision_to_pb(decision)

    @_counted_as("RecordResponse")
    def RecordResponse(self, request: pb.RecordResponseRequest, context: grpc.ServicerContext) -> pb.RecordResponseResponse:
        _require(request.decision_id, "decision_id")
        _require(request.action_id, "action_id")
        if request.outcome not in OUTCOME_NAMES:
            raise InvalidRequest("outcome", f"must be one of {', '.join(pb.Outcome.keys()[1:])}")
        ts = _seconds(request)
        outcome = OUTCOME_NAMES[request.outcome]
        with _redis_until(context):
            recorded = self.app.responses.record(request.decision_id, request.action_id, outcome, ts)
            if recorded.first:
                metrics.RESPONSES.labels(outcome).inc()
            # for a retry too: the first call may have failed after recording, before clearing (idempotent)
            self.app.events.on_response(recorded.customer_id, request.action_id, outcome)
        return pb.RecordResponseResponse(response_id=recorded.response_id)

    @_counted_as("PublishEvent")
    def PublishEvent(self, request: pb.PublishEventRequest, context: grpc.ServicerContext) -> pb.PublishEventResponse:
        ts = _seconds(request)
        with _redis_until(context):
            done = self.app.events.publish(request.event_id, request.customer_id, request.type,
                                           dict(request.attributes), ts)
        return pb.PublishEventResponse(
            stream_id=done.stream_id, duplicate=done.duplicate, patterns=done.patterns,
            triggers_raised=done.raised, triggers_cleared=done.cleared,
            outbound=[pb.OutboundAction(action_id=o.action_id, pattern=o.pattern, channel_name=o.channel,
                                        channel=CHANNEL_TO_PB.get(o.channel, pb.CHANNEL_UNSPECIFIED),
                                        status=o.status, decision_id=o.decision_id, reason=o.reason)
                      for o in done.outbound],
        )


class ProfileServicer(pb_grpc.ProfileServiceServicer):
    def __init__(self, app: App) -> None:
        self.app = app

    @_counted_as("UpdateProfile")
    def UpdateProfile(self, request: pb.UpdateProfileRequest,
                      context: grpc.ServicerContext) -> pb.UpdateProfileResponse:
        check_customer_id(request.customer_id)
        values: dict[str, object] = {}
        for name, value in request.attributes.items():
            kind = value.WhichOneof("value")
            if kind is None:
                raise InvalidRequest(f"attributes.{name}", "no value set")
            if kind == "date":
                timestamp_seconds(value.date.seconds, value.date.nanos, f"attributes.{name}.date")
            values[name] = (None if kind == "clear" else value.date.ToDatetime(tzinfo=UTC) if kind == "date"
                            else list(value.members.members) if kind == "members" else getattr(value, kind))
        schema = self.app.rules.current.schema
        try:
            change = check_update(schema, values)
        except InvalidAttribute as exc:
            raise InvalidRequest(exc.field, str(exc).split(": ", 1)[1]) from None
        with _redis_until(context):
            created, changed = apply_update(self.app.store, request.customer_id, change, schema, request.create_only)
        return pb.UpdateProfileResponse(created=created, changed=changed)


class AdminServicer(pb_grpc.AdminServiceServicer):
    def __init__(self, app: App) -> None:
        self.app = app

    @_counted_as("ReloadRules")
    def ReloadRules(self, request: pb.ReloadRulesRequest, context: grpc.ServicerContext) -> pb.ReloadRulesResponse:
        applied, version, errors = self.app.reload_rules(who=current_caller())
        return pb.ReloadRulesResponse(applied=applied, ruleset_version=version, errors=errors)

    @_counted_as("GetStatus")
    def GetStatus(self, request: pb.GetStatusRequest, context: grpc.ServicerContext) -> pb.GetStatusResponse:
        rules, model = self.app.rules.current, self.app.model.current
        ok, detail = self.app.store.ping()
        return pb.GetStatusResponse(
            ruleset_version=rules.version, ruleset_loaded_at=_timestamp(rules.ruleset.loaded_at.timestamp()),
            model_version=model.version, model_loaded_at=_timestamp(model.loaded_at),
            redis_ok=ok, redis_detail=detail, catalog_size=len(rules.ruleset.actions),
            service_version=__version__, worker_pid=os.getpid(),
            experiment_mode=model.mode, challenger_version=model.challenger.version if model.challenger else "",
            challenger_share=model.share if model.mode == "split" else 0.0,
            exploration_strategy=model.exploration.strategy if model.exploration.enabled else "none",
            exploration_share=model.exploration.share if model.exploration.enabled else 0.0,
            campaigns=_campaigns(self.app, rules.ruleset),
            **_rules_files(self.app),
        )

    def _jobs(self) -> PrivacyJobs:
        """This worker's privacy job runner, made and started on its first privacy call (App.close
        stops it)."""
        jobs = getattr(self.app, "privacy_jobs", None)
        if jobs is None:
            with _JOBS_LOCK:
                jobs = getattr(self.app, "privacy_jobs", None)
                if jobs is None:
                    admin_url = getattr(self.app.config, "redis_admin_url", None)
                    admin = redis_client(admin_url, self.app.config, timeout=5.0) if admin_url else None
                    jobs = PrivacyJobs(self.app.store.client, admin, lambda: self.app.rules.current.schema,
                                       clock=self.app.clock, archive=_archive_of(self.app.config))
                    self.app.privacy_jobs = jobs
        return jobs.start()

    @_counted_as("ForgetCustomer")
    def ForgetCustomer(self, request: pb.ForgetCustomerRequest,
                       context: grpc.ServicerContext) -> pb.ForgetCustomerResponse:
        check_customer_id(request.customer_id)
        job = self._jobs().submit("forget", request.customer_id, who=f"{current_caller()} via {context.peer()}")
        return pb.ForgetCustomerResponse(job_id=job)

    @_counted_as("ExportCustomer")
    def ExportCustomer(self, request: pb.ExportCustomerRequest,
                       context: grpc.ServicerContext) -> pb.ExportCustomerResponse:
        check_customer_id(request.customer_id)
        job = self._jobs().submit("export", request.customer_id, who=f"{current_caller()} via {context.peer()}")
        return pb.ExportCustomerResponse(job_id=job)

    @_counted_as("GetCustomerJob")
    def GetCustomerJob(self, request: pb.GetCustomerJobRequest, context: grpc.ServicerContext) -> pb.CustomerJob:
        _require(request.job_id, "job_id")
        try:
            f = self._jobs().get(request.job_id)
        except JobNotFound:
            raise NotFound("job_id", f"no privacy job {request.job_id[:64]!r} (unknown, or expired)") from None
        reply = pb.CustomerJob(
            job_id=f["job_id"], kind=f.get("kind", ""), state=f.get("state", ""),
            customer_pseudonym=f.get("pseudonym", ""), keys_deleted=int(f.get("keys_deleted") or 0),
            stream_entries_deleted=int(f.get("stream_entries_deleted") or 0),
            members_removed=int(f.get("members_removed") or 0),
            budget_units_returned=int(f.get("budget_units_returned") or 0),
            archive_rows_deleted=int(f.get("archive_rows_deleted") or 0), failures=f["failures"],
            persistence=f.get("persistence", ""), json=f.get("json", ""), requested_by=f.get("who", ""),
            created_at=_timestamp(int(f.get("created_ms") or 0) / 1000))
        if f.get("finished_ms"):
            reply.finished_at.CopyFrom(_timestamp(int(f["finished_ms"]) / 1000))
        return reply


def _campaigns(app: App, ruleset) -> list[pb.CampaignStatus]:
    """The live rule set's campaigns with their spend (none listed while Redis cannot be read)."""
    from engine.decision.campaigns import campaign_status

    try:
        statuses = campaign_status(app.store.client, list(ruleset.campaigns.values()), app.clock())
    except redis.exceptions.RedisError:
        return []
    return [pb.CampaignStatus(
        name=s.name, objective=s.objective, owner=s.owner, live=s.live, start=_timestamp(s.start), end=_timestamp(s.end),
        total_budget=-1 if s.total_budget is None else s.total_budget,
        daily_budget=-1 if s.daily_budget is None else s.daily_budget, spent=s.spent, spent_today=s.spent_today,
        budget_left=-1 if s.budget_left is None else s.budget_left, even_spend=s.even_spend or 0.0,
        pacing=s.pacing or 0.0) for s in statuses]


def _rules_files(app: App) -> dict:
    """GetStatus's fields about the rule directory: where, how often checked, and the last refused reload."""
    refused = app.rules_refused
    fields: dict = {"rules_dir": str(app.config.rules_dir.resolve()),
                    "rules_watch_seconds": app.config.rules_watch_seconds, "ruleset_files_digest": app.rules_digest}
    if refused is not None:
        fields["rules_refused"] = pb.RulesRefused(at=_timestamp(refused.at), ruleset_version=refused.version,
                                                  files_digest=refused.files_digest, errors=list(refused.errors))
    return fields


def channel_options(reuse_port: bool) -> list[tuple[str, int]]:
    """The gRPC server's channel options (``build_server``; the load tests' bare servers use them too)."""
    return [("grpc.so_reuseport", 1 if reuse_port else 0),
            # clients reconnect now and then, so connections spread over the workers again after one
            # was replaced (the kernel balances connections, not calls); calls in flight finish first.
            # It also bounds how long any one connection, and so any call on it, can hold anything.
            ("grpc.max_connection_age_ms", MAX_CONNECTION_AGE_MS),
            ("grpc.max_connection_age_grace_ms", 5_000),
            # a connection with no call for this long is closed: idle connections cost a descriptor and
            # buffers each; a client reconnects on its next call
            ("grpc.max_connection_idle_ms", MAX_CONNECTION_IDLE_MS),
            # a connection that has not finished its TLS and HTTP/2 handshake in 10 s is dropped (default 120 s)
            ("grpc.server_handshake_timeout_ms", 10_000),
            # beyond it the client queues its calls
            ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
            # keepalive enforcement: a client pinging more often than once a minute without calls in
            # flight gets a strike, after 2 the connection is closed (ping floods, CVE-2019-9512)
            ("grpc.http2.min_ping_interval_without_data_ms", 60_000),
            ("grpc.http2.max_ping_strikes", 2),
            ("grpc.keepalive_permit_without_calls", 0),
            # request headers: a token and a few grpc headers are well under 1 KiB
            ("grpc.max_metadata_size", 8 * 1024),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", 4 * MAX_MESSAGE_BYTES)]


def build_server(app: App, address: str, reuse_port: bool = False,
                 interceptors: Sequence[grpc.ServerInterceptor] = (),
                 tls: ServerCertificates | None = None, auth: AuthPolicy | None = None,
                 max_in_flight: int = MAX_IN_FLIGHT, reflection: bool = False,
                 admission: Admission | None = None) -> tuple[grpc.Server, int, health.HealthServicer]:
    """A gRPC server with our services and grpc.health.v1 (and server reflection when ``reflection``);
    returns it and its bound port.

    ``reuse_port`` lets several worker processes listen on one port (the kernel balances connections).
    ``tls``: serve TLS only (mTLS when it has a client CA); ``auth``: callers and their roles.
    ``max_in_flight``: nba.v1 calls beyond this many at once get RESOURCE_EXHAUSTED at once (load
    shedding) instead of queueing until every call is late. Each admitted call has its own thread: a
    call waiting on a stalled Redis must not keep an admitted one from starting before its deadline.
    Health checks and streaming calls have threads and limits of their own (``admission``, default
    ``Admission(max_in_flight)``), so neither a flood of calls nor idle streams keep health from answering.
    """
    admission = admission or Admission(max_in_flight)
    # tracing after admission (which must run first, in the polling thread) and before the credential
    # check, so refused calls have spans too; it passes calls through untouched while tracing is off
    chain = [admission, TracingInterceptor(), caller_interceptor(app, auth, tls), *interceptors, DecodeGuard()]
    # every call runs on its lane's threads; these run only what no lane claims
    other = futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="grpc")
    server = grpc.server(other, options=channel_options(reuse_port), interceptors=chain,
                         maximum_concurrent_rpcs=admission.backstop())
    pb_grpc.add_DecisionServiceServicer_to_server(DecisionServicer(app), server)
    pb_grpc.add_AdminServiceServicer_to_server(AdminServicer(app), server)
    pb_grpc.add_ProfileServiceServicer_to_server(ProfileServicer(app), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if reflection:
        names = (
            pb.DESCRIPTOR.services_by_name["DecisionService"].full_name,
            pb.DESCRIPTOR.services_by_name["AdminService"].full_name,
            pb.DESCRIPTOR.services_by_name["ProfileService"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        )
        enable_reflection(names, server)  # grpc.reflection.v1 and v1alpha
    port = server.add_secure_port(address, tls.credentials()) if tls is not None else server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"cannot listen on {address}")
    return server, port, health_servicer
