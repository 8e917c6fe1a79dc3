"""What is learnt from decisions after they were made, off the funnel's hot path.

- ``recorded``: one DuckDB view per stream over the archive's files plus the streams' unarchived tails
  (each entry once), for a range of ids or days: what every reader below aggregates in SQL;
- ``report``: ``nba report``, what decisions earned against the control group;
- ``uplift_curve``: its Qini curves, AUUC and uplift estimates of the decisions ranked by uplift;
- ``campaign_plan`` (with ``plan_replay``, the replay of coming decisions): ``nba campaign plan``;
- ``campaign_report`` and ``campaign_html``: ``nba campaign report`` (text, HTML);
- ``training_rows``: training rows from recorded decisions joined with their responses (and uplift's
  untreated rows: the candidates not shown, joined with ``offer_accepted`` events);
- ``offpolicy``: off-policy estimators (IPS, SNIPS, DR) of what a candidate policy would have earned;
- ``past``: offers and outcomes from before the engine, imported from a file (contact histories, a first
  training set).

May import: decision, models, rules, store and the ground modules; not events, authoring, sim or serving.
"""
