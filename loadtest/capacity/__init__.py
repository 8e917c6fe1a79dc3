"""The storage measurements behind ``op_costs.py``'s modes: ``decision_bytes`` (``--bytes-per-decision``: Redis
bytes and keys per decision by key family, and the response retention's cost) and ``import_rate``
(``--import-rate``: ``nba import customers`` against a plain redis-py pipeline)."""
