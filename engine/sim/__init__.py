"""The synthetic world and what is measured in it: customers with a hidden ground truth
(``world``), responses drawn from it to train the demo model (``training_data``), demo seeding
(``demo``), the policy simulation against baselines and an oracle (``simulate``) and large synthetic
rule sets for benchmarks (``synthetic_rules``).

May import: decision, models, rules, store and the ground modules. The service imports it only to
seed the demo.
"""
