"""Hypothesis runs a fixed set of examples by default, so a CI run passes or fails the
same way every time; ``HYPOTHESIS_PROFILE=explore`` searches fresh random examples."""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
