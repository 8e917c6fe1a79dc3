"""State in Redis: customer profiles and their key layout (``profiles``), the embedded
redis-server the service starts when no ``REDIS_URL`` is given (``redis_embedded``), and the
decision stream written off the request path (``decision_log``).

May import: the ground modules only.
"""
