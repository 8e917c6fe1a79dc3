"""The marketer's safety net for rule changes: rule tests (``ruletests``, ``eventtests``, with
``results``), the gate a rule set passes before it goes live (``check``: load, compile, test), the
file watch behind hot reload (``watch``) and the what-if of two rule sets (``whatif``).

Rule tests run the real rules and arbitration, so this wing sits above decision. May import:
decision, models, rules, store and the ground modules.
"""
