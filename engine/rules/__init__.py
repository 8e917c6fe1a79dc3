"""Rules owned by marketers, as data: the condition language, loading the rule files, and running
them on durable-rules.

- language: ``lexer`` -> ``parser`` (``nodes``) -> ``checker`` (names and types against the feature
  schema) -> ``normalize`` (durable-rules' limits) and ``evaluate`` (the reference interpreter);
  ``lang`` is the one-call facade, ``errors`` the file:line:col reports, ``reference`` the name list.
- loading: ``yamlsrc`` (YAML with positions) -> ``loader`` (catalog, policies, levers; ``contact``
  for contact.yaml, its quiet hours on ``timezones``' wall clocks; ``patterns`` for events.yaml,
  ``campaigns`` for campaigns/*.yaml) -> ``model`` (the loaded ``RuleSet``).
- running: ``compile`` (one durable ruleset, ``network`` keeps facts inside its limits) ->
  ``runtime`` (``CompiledRules``: ``facts`` encoding, durable evaluation, ``vector`` per-action
  numba program); ``bench`` times it.

Loading and running are one package, not two: the loader compiles event patterns (``patterns`` uses
``compile``), so the seams would import each other.

May import: the ground modules (``engine.features``, ``engine.errors``, ``engine.metrics``). Nothing
here knows about Redis, models or the decision funnel; rule tests run through the funnel and so live
above it, in ``engine.authoring``.
"""
