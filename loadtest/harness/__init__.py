"""What the load tools share: their common arguments (``args``), result summaries and tables (``results``),
the servers they start and the CPU they read from /proc (``servers``), the one-process open-loop clients,
one of them alternating request by request for the A/B comparisons (``clients``), the bare transport
server (``bare_server``), and one Redis node or a local Redis Cluster with what each node did
(``redis_backends``: ``op_costs.py`` and ``bench_cluster.py``).

The tools put ``loadtest/`` on ``sys.path`` and import ``harness.<module>``; none of these runs on its own
(the bare server runs as ``python loadtest/bench_ceiling.py --serve-bare``).
"""
