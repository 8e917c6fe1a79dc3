"""The calls to a running server: ``nba decide``, ``nba respond``, ``nba event`` and the privacy jobs
``nba customer forget`` / ``export`` / ``job``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from engine.commands.common import rpc
from engine.commands.options import client_options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("decide", help="ask a running server for a decision and print it")
    p.add_argument("customer_id")
    p.add_argument("--channel", default="web", help="a channel domain.yaml declares (default web)")
    p.add_argument("--touchpoint", default="")
    p.add_argument("--context", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--max-actions", type=int, default=0)
    p.add_argument("--explain", action="store_true", help="show where every catalog action dropped out")
    p.add_argument("--interaction", default="", metavar="ID",
                   help="interaction id: asking again with it returns the same decision (no second impression)")
    p.add_argument("--preview", action="store_true", help="decide without side effects (nothing counted or recorded)")
    client_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_decide)

    p = sub.add_parser("respond", help="record a customer's response to an action of a decision")
    p.add_argument("decision_id")
    p.add_argument("action_id")
    p.add_argument("outcome", choices=["impression", "clicked", "accepted", "rejected", "ignored"])
    client_options(p)
    p.set_defaults(fn=cmd_respond)

    p = sub.add_parser("event", help="publish an event to a running server (rules/events.yaml)")
    p.add_argument("customer_id")
    p.add_argument("type", help="an event type of rules/events.yaml, e.g. contact_request")
    p.add_argument("attributes", nargs="*", metavar="NAME=VALUE", help="e.g. topic=billing")
    p.add_argument("--event-id", default="", help="default: a new random id (send one twice to see a replay)")
    client_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_event)
    _customer_parsers(sub)


def _customer_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("customer", help="privacy: erase or export everything stored about a customer")
    customer = p.add_subparsers(dest="customer_cmd", required=True)
    p = customer.add_parser("forget", help="erase the customer everywhere (profile, history, records, stream "
                                           "entries, then the AOF/RDB files); an audited job, waited for")
    p.add_argument("customer_id")
    p.add_argument("--wait", type=float, default=900.0, help="seconds to wait for the job (default 900)")
    client_options(p)
    p.set_defaults(fn=cmd_customer)
    p = customer.add_parser("export", help="everything stored about the customer in plain documented fields, as "
                                           "JSON; an audited job, waited for")
    p.add_argument("customer_id")
    p.add_argument("--out", metavar="FILE", help="write it to FILE (mode 0600) instead of stdout")
    p.add_argument("--wait", type=float, default=300.0, help="seconds to wait for the job (default 300)")
    client_options(p)
    p.set_defaults(fn=cmd_customer)
    p = customer.add_parser("job", help="the state of a forget or export job (its id as forget/export printed)")
    p.add_argument("job_id")
    p.add_argument("--out", metavar="FILE", help="an export's document to FILE (mode 0600) instead of stdout")
    p.add_argument("--wait", type=float, default=0.0, help="seconds to wait for the job to end (default 0)")
    client_options(p)
    p.set_defaults(fn=cmd_customer)


def cmd_decide(args: argparse.Namespace) -> int:

    from engine.api.nba.v1 import nba_pb2 as pb
    from engine.serving.server import CHANNEL_TO_PB

    context = dict(kv.split("=", 1) for kv in args.context)
    request = pb.DecideRequest(customer_id=args.customer_id, channel_name=args.channel,
                               channel=CHANNEL_TO_PB.get(args.channel, pb.CHANNEL_UNSPECIFIED),
                               touchpoint=args.touchpoint, context=context,
                               max_actions=args.max_actions, explain=args.explain,
                               interaction_id=args.interaction, preview=args.preview)
    reply = rpc(args, "DecisionService", "Decide", request)
    if args.json:
        from google.protobuf.json_format import MessageToDict

        print(json.dumps(MessageToDict(reply, preserving_proto_field_name=True), indent=2))
        return 0
    print(format_decision(reply))
    return 0


def cmd_event(args: argparse.Namespace) -> int:
    import uuid

    from engine.api.nba.v1 import nba_pb2 as pb

    request = pb.PublishEventRequest(event_id=args.event_id or uuid.uuid4().hex, customer_id=args.customer_id,
                                     type=args.type, attributes=dict(kv.split("=", 1) for kv in args.attributes))
    reply = rpc(args, "DecisionService", "PublishEvent", request)
    from google.protobuf.json_format import MessageToDict

    print(json.dumps(MessageToDict(reply, preserving_proto_field_name=True), indent=2) if args.json else (
        "duplicate: already processed" if reply.duplicate else
        f"event {request.event_id}: patterns {', '.join(reply.patterns) or '-'}; raised "
        f"{', '.join(reply.triggers_raised) or '-'}; cleared {', '.join(reply.triggers_cleared) or '-'}"
        + "".join(f"\noutbound {o.action_id} ({o.pattern}): {o.status}" + (f", {o.reason}" if o.reason else "")
                  for o in reply.outbound)))
    return 0


def cmd_respond(args: argparse.Namespace) -> int:

    from engine.api.nba.v1 import nba_pb2 as pb

    request = pb.RecordResponseRequest(decision_id=args.decision_id, action_id=args.action_id,
                                       outcome=f"OUTCOME_{args.outcome.upper()}")
    reply = rpc(args, "DecisionService", "RecordResponse", request)
    print(f"recorded {args.outcome} of {args.action_id} in {args.decision_id}: {reply.response_id}")
    return 0


def cmd_customer(args: argparse.Namespace) -> int:
    """``nba customer forget ID`` / ``export ID``: queue the privacy job on a running server, wait for it
    (``--wait`` seconds, polling ``GetCustomerJob``) and print its result; exit 1 when it failed (every
    failure on stderr) or is still running at the end of the wait (its job id printed to ask again)."""

    from engine.api.nba.v1 import nba_pb2 as pb

    if args.customer_cmd == "job":
        job_id = args.job_id
    elif args.customer_cmd == "forget":
        job_id = rpc(args, "AdminService", "ForgetCustomer", pb.ForgetCustomerRequest(customer_id=args.customer_id)).job_id
    else:
        job_id = rpc(args, "AdminService", "ExportCustomer", pb.ExportCustomerRequest(customer_id=args.customer_id)).job_id
    job = _wait_for_job(args, job_id)
    for failure in job.failures:
        print(f"failure: {failure}", file=sys.stderr)
    if job.state not in ("succeeded", "failed"):
        print(f"job {job_id} still {job.state} after {args.wait:g}s: ask again with nba customer job {job_id}",
              file=sys.stderr)
        return 1
    if job.kind == "forget":
        who = getattr(args, "customer_id", job.customer_pseudonym)
        print(f"forgot {who}: {job.keys_deleted} keys, {job.stream_entries_deleted} stream entries, "
              f"{job.members_removed} timers and reservations deleted; {job.persistence} "
              f"(job {job_id}, {job.state}; audited as {job.customer_pseudonym})")
        return 0 if job.state == "succeeded" else 1
    if job.state != "succeeded":
        return 1
    _write_export(args, job_id, job.json)
    return 0


def _wait_for_job(args: argparse.Namespace, job_id: str):
    """The job's ``GetCustomerJob`` reply once it ended, or at the end of --wait seconds."""
    from engine.api.nba.v1 import nba_pb2 as pb

    deadline = time.monotonic() + args.wait
    while True:
        job = rpc(args, "AdminService", "GetCustomerJob", pb.GetCustomerJobRequest(job_id=job_id))
        if job.state in ("succeeded", "failed") or time.monotonic() > deadline:
            return job
        time.sleep(0.2)


def _write_export(args: argparse.Namespace, job_id: str, document: str) -> None:
    """An export's document, indented, to --out (mode 0600) or to stdout."""
    text = json.dumps(json.loads(document), indent=2, ensure_ascii=False, sort_keys=True) + "\n"
    if getattr(args, "out", None):
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # personal data: owner only
        os.fchmod(fd, 0o600)  # also when the file was there before
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        print(f"exported {job_id} to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)


def format_decision(reply) -> str:
    from engine.api.nba.v1 import nba_pb2 as pb

    lines = [
        f"decision {reply.decision_id}  ruleset {reply.ruleset_version}  model {reply.model_version}"
        + ("  DEGRADED" if reply.degraded else "") + ("  cold start" if reply.cold_start else "")
        + ("  control group" if reply.control_group else "") + ("  repeat" if reply.repeat else "")
        + ("  preview" if reply.preview else ""),
    ]
    if reply.situations:
        lines.append("situations: " + ", ".join(reply.situations))
    header = f"{'#':>2}  {'action':28} {'type':12} {'propensity':>10} {'value':>8} {'priority':>9}  reasons"
    lines += [header, "-" * len(header)]
    for a in reply.actions:
        type_name = a.type_name or pb.ActionType.Name(a.type).removeprefix("ACTION_TYPE_").lower()
        lines.append(f"{a.rank:>2}  {a.action_id:28} {type_name:12} {a.propensity:>10.4f} {a.value:>8.2f} "
                     f"{a.priority:>9.3f}  {'; '.join(a.reasons)}")
    for f in reply.funnel:
        lines.append(f"    funnel {f.action_id:28} {f.stage:13} {f.detail}")
    return "\n".join(lines)
