"""The synthetic world and what is measured in it: customers with a hidden ground truth and unobserved
traits, and in the uplift world sure things and sleeping dogs (``world``), what happens to them over time:
holdings, fatigue, late responses, drift, new actions, organic purchases (``dynamics``), responses drawn
from it to train the demo model (``training_data``), demo seeding (``demo``), the telco demo's domain
(``telco``), customers and histories generated for any domain.yaml (``datagen``), the policy simulation
against baselines and oracles on a private Redis, with a model trained only on recorded traffic of
another population (``simulate``), and large synthetic rule sets for benchmarks (``synthetic_rules``).

May import: analytics, decision, models, rules, store and the ground modules. The service imports it only to
seed the demo.
"""
