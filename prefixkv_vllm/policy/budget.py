"""The one check of a KV budget (the server's, a request's, a policy's): a number in (0, 1]."""

from __future__ import annotations

import math
from typing import Any


def check_budget(value: Any) -> float:
    """``value`` as a float; ``ValueError`` says what is wrong, and the caller names the setting."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise ValueError(f"must be a number in (0, 1], got {value!r}")
    return float(value)
