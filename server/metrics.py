"""Every Prometheus metric of the server, on a registry made per app (tests never share state).

| name                                        | type      | labels           | what                              |
|---------------------------------------------|-----------|------------------|-----------------------------------|
| capguard_requests_total                     | counter   | endpoint, status | answered requests (route template)|
| capguard_request_duration_seconds           | histogram | endpoint         | request wall time                 |
| capguard_captions_total                     | counter   | checkpoint       | captions served                   |
| capguard_generated_tokens_total             | counter   | checkpoint       | tokens generated (EOS excluded)   |
| capguard_guard_trips_total                  | counter   | checkpoint, rule | guard rules that tripped          |
| capguard_fallbacks_total                    | counter   | requested, served | requests answered by another checkpoint (collapse_policy=fallback) |
| capguard_degenerate_captions_total          | counter   | checkpoint, kind | captions that loop or hit max_new_tokens |
| capguard_repetition_stops_total             | counter   | checkpoint, engine | captions ended early by stop_on_repetition |
| capguard_stage_duration_seconds             | histogram | stage            | decode per video; encode, generate, score per batch |
| capguard_siglip_score                       | histogram | checkpoint       | scorer probability (0-1)          |
| capguard_batch_size                         | histogram |                  | videos per model call             |
| capguard_window_captions                    | gauge     | checkpoint       | captions in the guard window      |
| capguard_window_unique_ratio                | gauge     | checkpoint       | 0-1                               |
| capguard_window_near_unique_ratio           | gauge     | checkpoint       | 0-1                               |
| capguard_window_top_mode_share              | gauge     | checkpoint       | 0-1                               |
| capguard_window_repeat_probability          | gauge     | checkpoint       | 0-1                               |
| capguard_window_siglip_mean                 | gauge     | checkpoint       | 0-1                               |
| capguard_window_grounding_r1                | gauge     | checkpoint       | 0-1                               |
| capguard_window_content_unique_ratio        | gauge     | checkpoint       | 0-1                               |
| capguard_window_vendi_score                 | gauge     | checkpoint       | 1 to window size                  |
| capguard_window_degenerate_share            | gauge     | checkpoint       | 0-1                               |
| capguard_collapse_flag                      | gauge     | checkpoint       | 1 while the guard says collapsed  |
| capguard_queue_depth                        | gauge     |                  | requests waiting for the model    |
| capguard_decoder_restarts_total             | counter   | reason           | decoder processes replaced        |
| capguard_evaluation_jobs                    | gauge     | status           | evaluation jobs per status        |
| capguard_evaluation_diversity               | gauge     | checkpoint       | last finished report's diversity |
| capguard_engine_info                        | gauge     | checkpoint, engine, version | 1 per loaded checkpoint: its LLM engine |

Window gauges with no value yet (e.g. grounding without a scorer) read NaN, which no alert
comparison matches.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SCORE_BUCKETS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)

# GuardState attribute -> gauge name (without the capguard_ prefix)
WINDOW_GAUGES = {
    "window_captions": "window_captions",
    "unique_ratio": "window_unique_ratio",
    "near_unique_ratio": "window_near_unique_ratio",
    "top_mode_share": "window_top_mode_share",
    "repeat_probability": "window_repeat_probability",
    "siglip_mean": "window_siglip_mean",
    "grounding_r1": "window_grounding_r1",
    "content_unique_ratio": "window_content_unique_ratio",
    "vendi_score": "window_vendi_score",
    "degenerate_share": "window_degenerate_share",
}


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = r = registry or CollectorRegistry()
        self.requests = Counter("capguard_requests", "Answered HTTP requests", ["endpoint", "status"], registry=r)
        self.request_seconds = Histogram("capguard_request_duration_seconds", "HTTP request wall time",
                                         ["endpoint"], buckets=REQUEST_BUCKETS, registry=r)
        self.captions = Counter("capguard_captions", "Captions served", ["checkpoint"], registry=r)
        self.tokens = Counter("capguard_generated_tokens", "Tokens generated", ["checkpoint"], registry=r)
        self.trips = Counter("capguard_guard_trips", "Guard rules that tripped", ["checkpoint", "rule"], registry=r)
        self.fallbacks = Counter("capguard_fallbacks", "Requests for a collapsed checkpoint answered by another "
                                 "(collapse_policy=fallback)", ["requested", "served"], registry=r)
        self.degenerate = Counter("capguard_degenerate_captions", "Captions that loop or hit max_new_tokens, by kind",
                                  ["checkpoint", "kind"], registry=r)
        # finish reason "repetition": the engine (vLLM's repetition_detection, or capguard's own on hf) ended the row
        self.repetition_stops = Counter("capguard_repetition_stops", "Captions ended early by stop_on_repetition",
                                        ["checkpoint", "engine"], registry=r)
        self.stage_seconds = Histogram("capguard_stage_duration_seconds",
                                       "Pipeline stage time: decode per video, model stages per batch",
                                       ["stage"], buckets=STAGE_BUCKETS, registry=r)
        self.siglip = Histogram("capguard_siglip_score", "Scorer caption-video probability", ["checkpoint"],
                                buckets=SCORE_BUCKETS, registry=r)
        self.batch_size = Histogram("capguard_batch_size", "Videos per model call", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.window = {attr: Gauge(f"capguard_{name}", f"Guard window: {name.removeprefix('window_')}",
                                   ["checkpoint"], registry=r)
                       for attr, name in WINDOW_GAUGES.items()}
        self.collapse_flag = Gauge("capguard_collapse_flag", "1 while the guard flags the checkpoint collapsed",
                                   ["checkpoint"], registry=r)
        self.queue_depth = Gauge("capguard_queue_depth", "Requests waiting for the model", registry=r)
        self.decoder_restarts = Counter("capguard_decoder_restarts", "Decoder processes replaced",
                                        ["reason"], registry=r)
        self.evaluation_jobs = Gauge("capguard_evaluation_jobs", "Evaluation jobs per status", ["status"],
                                     registry=r)
        # an info metric (value 1): which LLM engine serves each loaded checkpoint, and the engine library's version
        self.engine_info = Gauge("capguard_engine_info", "LLM engine of a loaded checkpoint (value 1)",
                                 ["checkpoint", "engine", "version"], registry=r)
        self._engine_labels: set[tuple[str, str, str]] = set()
        self.evaluation_diversity = Gauge("capguard_evaluation_diversity",
                                          "Diversity (unique captions / captions) in the last finished evaluation",
                                          ["checkpoint"], registry=r)

    def track_queue(self, depth: Callable[[], float]) -> None:
        """Read the queue depth at scrape time."""
        self.queue_depth.set_function(depth)

    def checkpoint_loaded(self, checkpoint: str, engine: str = "hf", version: str = "") -> None:
        """Create a loaded checkpoint's counter series at 0, so rates and alerts see them from the start, and say
        which engine generates its captions (auto resolves per LLM, so two checkpoints may differ)."""
        from capguard.models.degenerate import KINDS
        from capguard.models.rules import RULES

        for labels in [labels for labels in self._engine_labels if labels[0] == checkpoint]:
            self.engine_info.remove(*labels)   # a reload on another engine replaces the series
        self._engine_labels.add((checkpoint, engine, version))
        self.engine_info.labels(checkpoint, engine, version).set(1)

        self.captions.labels(checkpoint)
        self.tokens.labels(checkpoint)
        for rule in RULES:
            self.trips.labels(checkpoint, rule)
        for kind in KINDS:
            self.degenerate.labels(checkpoint, kind)
        self.repetition_stops.labels(checkpoint, engine)

    def observe_guard(self, checkpoint: str, state, count_trips: bool = True) -> None:
        """Set the window gauges from a GuardState; count the rules that tripped on this observe
        (count_trips=False for a state that was read, not observed, e.g. after a restore)."""
        for attr, gauge in self.window.items():
            value = getattr(state, attr, None)
            gauge.labels(checkpoint).set(math.nan if value is None else float(value))
        self.collapse_flag.labels(checkpoint).set(1.0 if state.status == "collapsed" else 0.0)
        for rule in (getattr(state, "newly_tripped", None) or ()) if count_trips else ():
            self.trips.labels(checkpoint, rule).inc()

    def observe_evaluation_jobs(self, counts: dict[str, int]) -> None:
        """Set the jobs gauge from {status: count} (every status, zeros included)."""
        for status, count in counts.items():
            self.evaluation_jobs.labels(status).set(count)

    def observe_evaluation_report(self, report: dict) -> None:
        """Diversity per checkpoint of a finished report; checkpoints of older reports are dropped."""
        self.evaluation_diversity.clear()
        for row in report.get("checkpoints") or []:
            diversity = row.get("diversity")
            self.evaluation_diversity.labels(row["name"]).set(math.nan if diversity is None else diversity)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
