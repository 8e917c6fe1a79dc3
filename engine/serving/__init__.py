"""Serving: the gRPC layer (``server``: messages to plain-Python calls, errors to status codes),
the composition of one worker (``app``: store, rules, models, engine, events wired together), the
supervisor that runs workers and the embedded Redis (``serve``), and the code generator for
``engine/api`` (``protogen``).

May import every wing below it; nothing imports serving except ``engine.cli``.
"""
