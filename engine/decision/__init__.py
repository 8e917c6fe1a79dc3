"""The decision funnel: one ``Decide`` as plain Python, and what happens to a decision afterwards.

- ``request``: the request and its validation (errors name the field);
- ``funnel``: ``DecisionEngine``, the stages in order (profile, derive, rules, scoring,
  arbitration, presenting, logging), each timed; ``traces``: their spans when tracing is on;
- ``arbitration``: priority order, one action per group, the top N, the fallback, explanations;
- ``contact``: contact limits and budgets applied atomically in Redis when actions are presented;
- ``history``: the contact history those limits count, as bounded counters per action, channel and day;
- ``interactions``: what a decision stores for its interaction id (one voice, safe retries);
- ``reservations``: gives back the budget units of impressions a channel did not report in time;
- ``responses``: ``RecordResponse``; ``report``: what decisions earned against the control group;
- ``past``: offers and outcomes from before the engine, imported from a file (contact histories, a first
  training set);
- ``campaigns``: a campaign's control group, budgets (counted by ``contact``'s script), status and gauges;
  ``campaign_plan`` (with ``plan_replay``): ``nba campaign plan``; ``campaign_report`` and
  ``campaign_html``: ``nba campaign report``.

May import: models, rules, store and the ground modules; not events, sim, authoring or serving.
"""
