"""What the load tools share: their common arguments (``args``), result summaries and tables (``results``),
the servers they start and the CPU they read from /proc (``servers``), the one-process open-loop clients,
one of them alternating request by request for the A/B comparisons (``clients``), and the bare transport
server (``bare_server``).

The tools put ``loadtest/`` on ``sys.path`` and import ``harness.<module>``; none of these runs on its own
(the bare server runs as ``python loadtest/bench_ceiling.py --serve-bare``).
"""
