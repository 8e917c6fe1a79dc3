"""What is learnt from decisions after they were made, off the funnel's hot path.

- ``report``: ``nba report``, what decisions earned against the control group;
- ``campaign_plan`` (with ``plan_replay``, the replay of coming decisions): ``nba campaign plan``;
- ``campaign_report`` and ``campaign_html``: ``nba campaign report`` (text, HTML);
- ``past``: offers and outcomes from before the engine, imported from a file (contact histories, a first
  training set).

May import: decision, models, rules, store and the ground modules; not events, authoring, sim or serving.
"""
