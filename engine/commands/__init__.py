"""The ``nba`` command's subcommands, one module per command group. ``engine.cli`` builds the top
parser, asks each group to ``register`` its parsers (each parser's handler as ``set_defaults(fn=...)``)
and runs the handler the command line chose.

- ``options``: the option sets several commands share (Redis, rule and model paths, the archive, a
  range of decisions, the connection to a running server);
- ``common``: what the handlers share: the configuration from the options, a channel and a call to a
  running server, a store on Redis, audit records, the archive a report reads, the live model, rule
  errors printed as file:line:col;
- ``serve``: ``nba serve`` and ``nba auth token``; ``loadtest``: ``nba loadtest`` (loadtest/loadgen.py);
- ``training``: ``nba seed``, ``nba train``, ``nba simulate``;
- ``report``: ``nba report`` and the archive it reads (``nba archive``); ``campaign``: ``nba campaign
  plan`` and ``report``;
- ``customer``: the calls to a running server: ``nba decide``, ``respond``, ``event`` and ``customer
  forget`` / ``export`` / ``job``;
- ``rules``: ``nba rules check`` / ``status`` / ``test`` / ``diff``; ``models``: ``nba models``;
- ``data``: ``nba import customers`` / ``history`` and ``nba profiles``.

A handler imports what it uses when it runs, so building the parser (``nba --help``) loads none of
the engine's wings.

May import: every wing below it (serving, sim, analytics, authoring, events, api, decision, rules,
models, store) and the ground modules; only ``engine.cli`` imports it.
"""
