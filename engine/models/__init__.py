"""Propensity models: derived features (``derived``, numba), the model's input layout
(``model_input``), LightGBM trees compiled to arrays (``trees``, ``scorer``) and bound to the
catalog (``bound_scorer``), training and holdout metrics, and uplift's organic model (``training``), the registry of stored
models (``registry``), champion / challenger, arbitration and hot swap (``experiment``) and Thompson-sampling
exploration (``exploration``).

May import: store and the ground modules. Models know nothing of rules: the decision funnel joins
the two.
"""
