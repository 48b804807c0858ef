"""One way to make figures JSON-able: nan/inf -> None, numpy scalars -> Python, recursively.

JSON has no nan, and a metric that is undefined for its input (no captions, fewer than two to compare) is
nan throughout models/; every report, API response and row written to disk goes through ``jsonable``.
"""

from __future__ import annotations

import math

import numpy as np


def jsonable(value):
    """Example: {"a": np.float32(0.5), "b": (float("nan"), np.int64(3)), 1: True} -> {"a": 0.5, "b": [None, 3],
    "1": True}. Dict keys become strings (JSON's only key type); anything else is returned as it is.
    """
    if isinstance(value, dict):
        return {k if isinstance(k, str) else str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


__all__ = ["jsonable"]
