"""State in Redis: customer profiles and their key layout, and the one place a Redis client is built
(``profiles``), partial profile updates and layout migration (``updates``), the bulk import of customer
files (``bulk``), the embedded redis-server the service starts when no ``REDIS_URL`` is given
(``redis_embedded``), the decision stream written off the request path (``decision_log``), the
audit trail (``audit``) and the archive of the decision, response and event streams in Parquet files
(``archive``: writer, checkpoints, reader; ``archive_fs``: local directories and fsspec URLs, the DuckDB
connection; ``archive_lock``: the writer's and the files' locks; ``archive_erasure``: a customer's rows
erased from the files; ``archive_compact``: a closed day's files merged).

May import: the ground modules only.
"""
