"""The decision funnel: one ``Decide`` as plain Python, and what happens to a decision afterwards.

- ``request``: the request and its validation (errors name the field);
- ``funnel``: ``DecisionEngine``, the stages in order (profile, derive, rules, scoring,
  arbitration, presenting, logging), each timed; ``traces``: their spans when tracing is on;
- ``arbitration``: priority order, one action per group, the top N, the fallback, explanations;
- ``contact``: contact limits and budgets applied atomically in Redis when actions are presented;
- ``history``: the contact history those limits count, as bounded counters per action, channel and day;
- ``records``: the decision records ``RecordResponse`` checks, packed as fields of one hash per minute and
  hash slot, with ``codes``: the append-only dictionary of the codes they are packed with;
- ``interactions``: what a decision stores for its interaction id (one voice, safe retries);
- ``reservations``: gives back the budget units of impressions a channel did not report in time;
- ``responses``: ``RecordResponse``;
- ``campaigns``: a campaign's control group, budgets (counted by ``contact``'s script), status and gauges.

The funnel's hot path lives here; what reads decisions afterwards (reports, plans, training sets) is
``engine.analytics``'s.

May import: models, rules, store and the ground modules; not analytics, events, sim, authoring or serving.
"""
