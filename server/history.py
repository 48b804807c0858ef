"""The guard's figures over time, per checkpoint: what the web page's live chart draws.

    history = GuardHistory(points=500, every=1)
    history.add("demo", guard_state)        # run_batch's record step, after every observed caption
    history.get("demo", thresholds)         # GET /checkpoints/demo/guard/history

A point is taken every ``every`` captions a checkpoint serves (and one when its guard is restored at load),
and the last ``points`` points are kept: a deque per checkpoint, in memory. A restart starts a fresh
history from the restored window's point; the caption log keeps the captions, not the figures as they
were, and replaying a long log through the guard to redraw a chart is not worth a slow start.
Default 500 points at one per caption: five turnovers of the default 100-caption window, ~100 kB per
checkpoint. Thread-safe: the model thread adds while a request reads.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from capguard.models.jsonable import jsonable

FIGURES = ("unique_ratio", "near_unique_ratio", "top_mode_share", "grounding_r1", "siglip_mean",
           "repeat_probability", "content_unique_ratio", "degenerate_share")   # GuardState figures, all 0-1
EXTRA = ("vendi_score",)   # carried by each point, not drawn on the 0-1 axis (the Vendi score runs 1 to n)
# figure -> (rule kind, GuardThresholds field): the chart's rule lines; "min" trips below, "max" above
RULE_LINES = {"unique_ratio": ("min", "min_unique_ratio"), "near_unique_ratio": ("min", "min_near_unique_ratio"),
              "top_mode_share": ("max", "max_top_mode_share"), "grounding_r1": ("min", "min_grounding_r1"),
              "content_unique_ratio": ("min", "min_content_unique_ratio"),
              "degenerate_share": ("max", "max_degenerate_share")}


def rule_lines(thresholds: dict) -> list[dict]:
    """The rules in force as lines on the chart's 0-1 axis.

    Example: {"min_unique_ratio": 0.5, ...} -> [{"figure": "unique_ratio", "kind": "min", "value": 0.5}, ...].
    """
    return [{"figure": figure, "kind": kind, "value": thresholds[name]}
            for figure, (kind, name) in RULE_LINES.items() if thresholds.get(name) is not None]


class GuardHistory:
    def __init__(self, points: int = 500, every: int = 1):
        if points < 1 or every < 1:
            raise ValueError(f"history points and every must be >= 1, got {points} and {every}")
        self.points, self.every = points, every
        self._series: dict[str, deque] = {}
        self._seen: dict[str, int] = {}     # captions served per checkpoint since the server started
        self._lock = threading.Lock()

    def add(self, checkpoint: str, state, count: bool = True) -> None:
        """Count one caption of ``checkpoint`` (unless ``count`` is False: a restored window) and take a
        point of its guard ``state`` (a GuardState) when one is due."""
        with self._lock:
            seen = self._seen.get(checkpoint, 0) + (1 if count else 0)
            self._seen[checkpoint] = seen
            series = self._series.setdefault(checkpoint, deque(maxlen=self.points))
            if count and seen % self.every:
                return
            point = {"t": round(time.time(), 3), "captions_seen": seen, "window_captions": state.window_captions,
                     "status": state.status, "tripped": list(state.tripped)}
            point.update({figure: getattr(state, figure, None) for figure in FIGURES + EXTRA})
            series.append(jsonable(point))   # nan -> None: JSON has no nan

    def get(self, checkpoint: str, thresholds: dict) -> dict:
        """{"checkpoint", "every", "figures", "points" (oldest first), "rules"} for the API."""
        with self._lock:
            points = list(self._series.get(checkpoint, ()))
        return {"checkpoint": checkpoint, "every": self.every, "figures": list(FIGURES), "points": points,
                "rules": rule_lines(thresholds)}

    def forget(self, checkpoint: str) -> None:
        """Drop a checkpoint's history (its guard was rebuilt, e.g. new weights under the same name)."""
        with self._lock:
            self._series.pop(checkpoint, None)
            self._seen.pop(checkpoint, None)
