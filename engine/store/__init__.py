"""State in Redis: customer profiles and their key layout, and the one place a Redis client is built
(``profiles``), the embedded redis-server the service starts when no ``REDIS_URL`` is given
(``redis_embedded``), the decision stream written off the request path (``decision_log``) and the
audit trail (``audit``).

May import: the ground modules only.
"""
