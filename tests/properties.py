"""Hypothesis settings for the property and fuzz tests (imported by them, before they build settings).

They draw the same examples on every run (``derandomize``), so a red run is a failure that the same
command reproduces anywhere. ``HYPOTHESIS_PROFILE=explore`` draws new random examples, EXPLORE_FACTOR
times as many: the exploring run before a release (ARCHITECTURE.md, "Tests"); what it finds becomes an ``@example``.
"""

from __future__ import annotations

import os

from hypothesis import settings

EXPLORE = os.environ.get("HYPOTHESIS_PROFILE") == "explore"
EXPLORE_FACTOR = 50
settings.register_profile("repeatable", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False, database=None, print_blob=True)
settings.load_profile("explore" if EXPLORE else "repeatable")


def examples(n: int) -> int:
    """``n`` examples for a property test, EXPLORE_FACTOR times as many in the exploring run."""
    return n * EXPLORE_FACTOR if EXPLORE else n
