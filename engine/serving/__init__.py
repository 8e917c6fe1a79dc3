"""Serving: the gRPC layer (``server``: messages to plain-Python calls, errors to status codes),
who may call what (``security``: TLS and mTLS, callers and roles, rate limits), how many calls of each
kind run at once and for how long (``admission``: lanes, shedding, idle streams), the channel callers
open (``client``: retry policy, TLS, token), the composition of one worker (``app``: store, rules,
models, engine, events wired together), the supervisor that runs workers and the embedded Redis
(``serve``), its traces and log lines (``telemetry``: tracer provider, JSON logs; ``tracing``: a span
per call), a customer's export and erasure (``privacy``) run as audited jobs (``privacy_jobs``), server
reflection as v1 and v1alpha (``reflection``), the code generator for ``engine/api`` and the slim client
(``protogen``) and the check of the contract against the released one (``proto_compat``).

May import every wing below it; nothing imports serving except the ``nba`` command (``engine.cli``,
``engine.commands``).
"""
