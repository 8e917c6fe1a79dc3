"""Events, right event at the right time: ``processor`` (``PublishEvent``: dedup, per-customer
history in Redis, pattern evaluation, triggers, outbound decisions through the funnel), ``stream``
(the ingest stream's consumer group) and ``timers`` (absence timers claimed with a lease).

May import: decision (outbound goes through the funnel), rules, store and the ground modules.
"""
