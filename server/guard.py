"""The live collapse guard: one checkpoint's recent captions in a rolling window, and a verdict on them.

Every caption the server writes is ``observe``d by its checkpoint's ``Guard``. The guard keeps the captions
of the last ``window`` *distinct* videos, and once it holds ``min_captions`` of them it says ``ok`` or
``collapsed`` by the rules of docs/guard.md (``capguard.models.rules.tripped_rules``): exact unique ratio, near-duplicate
unique ratio, top mode share, grounding R@1 (caption -> own video among the window's videos, on the
scorer's embeddings), content-unique ratio (distinct content-morpheme keys: particles, endings and word order
ignored) and the share of captions that loop inside themselves. All figures come from
``capguard.models.diversity``, ``semantic`` and ``degenerate``; nothing here re-implements a metric.

Policies (each one a decision; the tests pin them):
- Distinct videos: the window is keyed by ``video_sha256``, least recently seen first. A video already in the
  window is *refreshed*: its row moves to the newest end and its caption/embeddings/score become the latest
  ones. So a client that uploads one video 100 times adds one caption to the window, evicts nobody and
  cannot fake a collapse; and the window always shows what the model says *now* for each video.
- Warm-up: below ``min_captions`` videos the status is ``warming_up``: figures are reported, no rule trips.
- Cost: the near-duplicate clustering and grounding ("full metrics", ``diversity_report(...,
  with_self_bleu=False)`` + ``grounding``) are recomputed every ``recompute_every`` observations, and also at
  the observation that ends warm-up, so the first verdict is always on fresh figures. The exact-unique
  ratio, Good-Turing repeat probability and SigLIP mean are kept as running counts and are live on every
  observation, so a hard collapse (the field report's 1/97) trips ``unique_ratio`` on the very observation
  that crosses the line whatever ``recompute_every`` is. The content-unique ratio (running counts of
  ``content_key``) and the looping share (running count of rows whose degeneration kind is a loop) are live
  the same way. The Vendi score of the text embeddings is kept as a ``RunningVendi`` (O(E^2) per row in or
  out) and scored every ``RunningVendi.SCORE_EVERY`` observations and at the end of warm-up (its
  eigen-decomposition costs about as much as the rest of an observation); it is reported, not a rule.
- Sampled and greedy captions share one window: a collapsed checkpoint's sampled captions are exactly unique
  but ungrounded, and one window flags it sooner than one per decoding mode (tests/test_guard_sampling.py). ``state.metrics_age`` says how many observations
  old the clustered/grounding figures are (0 = computed on this observation).
- Hysteresis, per rule: a rule trips (``tripped``) the first time it fails and stays tripped until it has
  passed ``clear_after`` consecutive evaluations (one evaluation per observation after warm-up; between
  full recomputes the clustered/grounding rules are judged on their last figures). The status is
  ``collapsed`` while any rule is tripped. ``newly_tripped`` lists the rules that tripped on this very
  observation, so a counter fed from it counts trips, not requests, and a ratio hovering on its line
  re-trips at most once per ``clear_after`` observations. ``state.clears_in`` says how many more passing
  evaluations each tripped-but-now-passing rule needs.
- Grounding uses only rows that carry both embeddings (no scorer -> none), and only when there are at least
  ``min_captions`` of them (R@1 on a handful of videos is noise); otherwise the rule is skipped (``None``).
- Bad input: a non-finite SigLIP score or embedding is dropped (stored as None) with a warning, so a broken
  scorer never fails a request; a wrong type or an embedding shape that does not match the window raises.
- Restart: ``restore(rows)`` rebuilds the window and the verdict; it equals observing the rows on a fresh
  guard (tested), and costs at most a few full recomputes, however many rows come in (see ``restore``).

Cost: windows up to 2,048 keep a ``SimilarityCache`` (the caption pairs' similarities) between recomputes,
so a recompute scores only the captions that entered since the last one, which is what keeps a verdict on
fresh figures affordable on every caption at the default window. Larger windows cluster afresh, quadratic
in the number of distinct captions, so the auto policy ``recompute_every = ceil((window / 100) ** 2)``
keeps the amortized cost at or below the window-100 figure at any size. The price at large windows is
staleness of the near-duplicate and grounding figures (at 10,000 they refresh once per window turnover)
and one model-thread stall per recompute; exact collapse is still caught live. Pick a smaller
``recompute_every`` when fresher near-duplicate figures are worth more than that. Measured figures per
window size: bench/RESULTS.md, "Guard and metrics overhead" (``bench/bench_guard.py``).

Thread safety: ``observe``, ``restore`` and ``reset`` hold the guard's lock; ``state()`` reads the last
published ``GuardState`` without it, so a /metrics scrape never waits on a recompute. A published state is
a snapshot: treat it as read-only.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
from threadpoolctl import ThreadpoolController

from capguard.models.degenerate import KINDS, LOOP_KINDS, degeneration, judge
from capguard.models.diversity import (
    DiversityReport,
    SimilarityCache,
    caption_key,
    diversity_report,
    grounding,
)
from capguard.models.jsonable import jsonable
from capguard.models.rules import (
    CLEAR_AFTER,
    MIN_CAPTIONS,
    RULES,
    THRESHOLD_NAMES,
    WINDOW,
    GuardThresholds,
    check_threshold_names,
    tripped_rules,
)
from capguard.models.semantic import RunningVendi, content_key

logger = logging.getLogger(__name__)

STATUSES = ("warming_up", "ok", "collapsed")
_AUTO_WINDOW = 100  # the window whose full recompute per observation is cheap enough; see docstring
_CACHE_MAX_WINDOW = 2048  # windows up to this keep pair similarities between recomputes (32 MB at most)
_blas: ThreadpoolController | None = None  # numpy's BLAS pools, found on first use
_JUDGE = object()  # observe(degenerate=...) default: judge the caption's loops here (no token counts)


def _one_blas_thread():
    """Context manager: numpy's BLAS on one thread while grounding runs.

    The guard runs on the model thread, next to torch's pool and the decoder processes. On a busy 2-core
    box, OpenBLAS's own 2 threads spin for a core and made grounding's (100, 64) x (64, 100) product over
    100x slower; one thread is faster even at a 10,000 window (bench/RESULTS.md). threadpoolctl sets the
    pool size for the block and restores it after.
    """
    global _blas
    if _blas is None:
        _blas = ThreadpoolController()
    return _blas.limit(limits=1, user_api="blas")


@dataclass
class GuardSettings:
    """How a guard windows, judges and paces itself (defaults and their reasons: capguard.models.rules)."""

    window: int = WINDOW              # distinct videos judged together
    min_captions: int = MIN_CAPTIONS  # no verdict below this many
    thresholds: GuardThresholds = field(default_factory=GuardThresholds)  # the rules, from models/rules.py
    # Full metrics every k observations; None = auto, ceil((window / 100) ** 2): 1 at the default window
    # (~0.5 ms each), 100 at 1,000, 10,000 at 10,000. The exact-unique rule is live either way.
    recompute_every: int | None = None
    clear_after: int = CLEAR_AFTER    # hysteresis: consecutive passing evaluations before a tripped rule clears
    top_modes: int = 5       # modes (representative captions) kept in the state for the API and the logs

    def __post_init__(self) -> None:
        if not isinstance(self.thresholds, GuardThresholds):
            raise TypeError(f"GuardSettings.thresholds must be a GuardThresholds, got {type(self.thresholds)}")
        for name in ("window", "min_captions", "clear_after", "top_modes"):
            if getattr(self, name) < 1:
                raise ValueError(f"GuardSettings.{name} must be >= 1, got {getattr(self, name)}")
        if self.min_captions > self.window:
            raise ValueError(f"GuardSettings.min_captions ({self.min_captions}) exceeds window ({self.window}): "
                             "the guard would never reach a verdict; lower min_captions or widen the window")
        if self.recompute_every is not None and self.recompute_every < 1:
            raise ValueError(f"GuardSettings.recompute_every must be >= 1 or None (auto), got {self.recompute_every}")

    @property
    def effective_recompute_every(self) -> int:
        """``recompute_every``, or the auto value. Example: window=100 -> 1; 150 -> 3; 1000 -> 100."""
        if self.recompute_every is not None:
            return self.recompute_every
        return max(1, math.ceil((self.window / _AUTO_WINDOW) ** 2))

    @classmethod
    def from_options(cls, options: dict) -> GuardSettings:
        """Build from one flat dict that mixes guard and threshold fields (e.g. server Settings' guard_*).

        Example: {"window": 50, "min_unique_ratio": 0.4} -> GuardSettings(window=50,
        thresholds=GuardThresholds(min_unique_ratio=0.4)). An unknown key raises, naming it.
        """
        own = {f.name for f in fields(cls)} - {"thresholds"}
        rule_names = set(THRESHOLD_NAMES)
        unknown = set(options) - own - rule_names
        if unknown:
            raise ValueError(f"unknown guard option(s) {sorted(unknown)}; known: {sorted(own | rule_names)}")
        thresholds = GuardThresholds(**{k: v for k, v in options.items() if k in rule_names})
        return cls(thresholds=thresholds, **{k: v for k, v in options.items() if k in own})


@dataclass
class GuardState:
    """One checkpoint's verdict and the figures behind it; ``to_dict`` is what a /caption response carries."""

    checkpoint: str                   # which checkpoint this window belongs to
    status: str                       # "warming_up" | "ok" | "collapsed"
    window_captions: int              # distinct videos in the window
    unique_ratio: float | None        # exact distinct captions / captions (live); None on an empty window
    near_unique_ratio: float | None   # near-duplicate clusters / captions (last full recompute)
    top_mode_share: float | None      # share of the largest cluster (last full recompute)
    repeat_probability: float | None  # Good-Turing chance the next caption repeats one in the window (live)
    siglip_mean: float | None         # mean scorer probability over the window's scored captions (live)
    grounding_r1: float | None        # caption -> own video R@1 in the window; None without embeddings
    grounding_margin: float | None    # mean own-video similarity minus the best other video's
    content_unique_ratio: float | None  # distinct content-morpheme keys / captions (live)
    vendi_score: float | None         # effective number of captions by meaning (1..n), text embeddings; None without
    degenerate_share: float | None    # share of the window's captions that loop inside themselves (live)
    tripped: list[str]                # rules tripped now (held by hysteresis until they pass clear_after times)
    newly_tripped: list[str]          # rules that tripped on this observation (feeds guard_trips_total)
    modes: list[dict]                 # top clusters: representative caption, count, share, variants
    thresholds: dict                  # the rules in force, so a response explains itself
    metrics_age: int = 0              # observations since near_unique/top_mode/grounding/modes were computed
    clears_in: dict = field(default_factory=dict)  # tripped rule now passing -> passing evaluations still needed

    def to_dict(self) -> dict:
        """JSON-able dict: plain Python types, nan/inf as None (JSON has no nan)."""
        return jsonable(asdict(self))


@dataclass(slots=True)
class _Row:
    """One video's latest caption in the window."""

    caption: str
    key: str                       # capguard.models.diversity.caption_key(caption): the identity exact counts use
    content: str                   # capguard.models.semantic.content_key(caption): what content-unique counts
    loop: bool                     # its degeneration kind is a loop (LOOP_KINDS)
    text_emb: np.ndarray | None    # (E,) float32, set together with video_emb or not at all
    video_emb: np.ndarray | None   # (E,) float32
    siglip: float | None


class Guard:
    """The rolling window and verdict of one checkpoint. Thread-safe; see the module docstring."""

    def __init__(self, checkpoint: str, settings: GuardSettings | None = None):
        self.checkpoint = checkpoint
        self.settings = settings if settings is not None else GuardSettings()
        self._every = self.settings.effective_recompute_every
        self._lock = threading.Lock()
        with self._lock:
            self._reset_locked()

    # ------------------------------------------------------------------ public API

    def observe(self, video_sha256: str, caption: str, text_emb: np.ndarray | None = None,
                video_emb: np.ndarray | None = None, siglip: float | None = None,
                degenerate: str | None = _JUDGE) -> GuardState:
        """Add one caption (refreshing its video if already in the window) and return the new verdict.

        degenerate: the caption's ``capguard.models.degenerate`` kind (or None), as the caller computed it with
        the token counts; left out, the guard judges the text itself (a loop needs no token count).
        """
        if degenerate is _JUDGE:
            degenerate = getattr(degeneration(caption), "kind", None)
        row = self._make_row(video_sha256, caption, text_emb, video_emb, siglip, degenerate)
        with self._lock:
            self._check_dim(row)
            self._step(video_sha256, row)
            return self._state

    def state(self) -> GuardState:
        """The verdict as of the last observation (lock-free: never waits on a recompute)."""
        return self._state

    def restore(self, rows: Iterable[dict]) -> GuardState:
        """Rebuild window and verdict from logged rows, oldest first; same result as observing them afresh.

        Each row: video_sha256, caption, and optionally text_emb, video_emb, siglip, num_tokens. The
        degeneration kind is judged again from the logged caption (the loop kinds, which are all the window
        counts, need no token limit). The guard's verdict at
        the end depends only on its last ``clear_after + 1`` evaluations (a rule is tripped iff it failed
        at one of the last ``clear_after``; ``newly_tripped`` compares with the one before), and those use
        the full report of the last recompute before them. So the rows before that tail are only counted
        into the window (plus the one or two recomputes that fall in the ``recompute_every`` rows just
        before the tail) and the tail is observed normally: a restart neither forgets nor clears a
        collapse, and restoring 100,000 logged rows costs at most ``clear_after + 3`` recomputes (tested).
        """
        prepared = []
        for i, raw in enumerate(rows):
            try:
                sha, caption = raw["video_sha256"], raw["caption"]
            except KeyError as exc:
                raise ValueError(f"restore row {i} lacks {exc}; rows need video_sha256 and caption "
                                 "(text_emb, video_emb, siglip optional)") from None
            finish = (raw.get("decoding") or {}).get("finish_reason")   # the caption log keeps how a row ended
            kind = getattr(judge(caption, raw.get("num_tokens"), raw.get("max_new_tokens"), finish), "kind", None)
            prepared.append((sha, self._make_row(sha, caption, raw.get("text_emb"), raw.get("video_emb"),
                                                 raw.get("siglip"), kind)))
        dims = {row.text_emb.shape[0] for _, row in prepared if row.text_emb is not None}
        if len(dims) > 1:
            raise ValueError(f"restore rows mix embedding sizes {sorted(dims)}; they come from different scorers. "
                             "Restore only rows of the current fingerprint/scorer")
        with self._lock:
            self._reset_locked()
            self._replaying = True  # the tail's transitions are history, not news: one summary line below
            tail = max(0, len(prepared) - (self.settings.clear_after + 1))
            try:
                for i, (sha, row) in enumerate(prepared):
                    if i >= tail:
                        self._step(sha, row)
                    # the Vendi score in force when the tail starts is the one of its last scoring beat
                    elif self._advance(sha, row, score=i >= tail - RunningVendi.SCORE_EVERY) and i >= tail - self._every:
                        self._recompute()  # the report in force when the tail starts
            finally:
                self._replaying = False
            log = logger.warning if self._state.status == "collapsed" else logger.info
            log("guard %s: restored %d rows -> %s %s (%d videos in the window)", self.checkpoint, len(prepared),
                self._state.status, self._state.tripped or "", len(self._rows))
            return self._state

    # ------------------------------------------------------------------ window bookkeeping (lock held)

    def _reset_locked(self) -> None:
        self._rows: OrderedDict[str, _Row] = OrderedDict()  # video_sha256 -> row, least recently seen first
        self._key_counts: Counter[str] = Counter()  # caption_key -> rows in the window with it
        self._singletons = 0          # keys seen exactly once in the window (Good-Turing f1)
        self._emb_rows = 0            # rows carrying embeddings
        self._emb_dim = 0             # their size E (meaningful while _emb_rows > 0)
        self._siglip_sum = 0.0        # running sum over rows with a score (re-summed every `window` observations)
        self._siglip_rows = 0
        self._content_counts: Counter[str] = Counter()  # content_key -> rows in the window with it
        self._loops = 0               # rows whose caption loops
        self._vendi: RunningVendi | None = None  # text embeddings' X^T X, made with the first embedding
        self._vendi_score: float | None = None   # its last score (every RunningVendi.SCORE_EVERY observations)
        self._observations = 0        # since reset; paces the recomputes
        self._report: DiversityReport | None = None  # last full recompute
        self._report_at = 0           # self._observations when it was computed
        # caption pair similarities kept between recomputes, so each scores only the captions new since the
        # last (a dense matrix: small windows only; larger ones recompute rarely and score afresh)
        self._similarities = (SimilarityCache(self.settings.thresholds.near_dup_threshold)
                              if self.settings.window <= _CACHE_MAX_WINDOW else None)
        self._tripped: dict[str, int] = {}  # tripped rule -> consecutive passing evaluations since it last failed
        self._replaying = False       # restore() is observing its tail: no per-transition logs
        self._state = self._publish([])

    def _make_row(self, video_sha256, caption, text_emb, video_emb, siglip, degenerate) -> _Row:
        """Validate one observation (no lock needed: touches no state)."""
        if not isinstance(video_sha256, str) or not video_sha256:
            raise TypeError(f"video_sha256 must be a non-empty str (the upload's content hash), got {video_sha256!r}")
        key = caption_key(caption)  # raises TypeError on a non-str caption
        if degenerate is not None and degenerate not in KINDS:
            raise ValueError(f"degenerate must be None or one of {KINDS}, got {degenerate!r}")
        if (text_emb is None) != (video_emb is None):
            raise ValueError("pass both text_emb and video_emb (the scorer's outputs for this caption) or neither")
        if text_emb is not None:
            text = np.array(text_emb, dtype=np.float32)    # (E,) a copy: the caller may reuse its buffer
            video = np.array(video_emb, dtype=np.float32)  # (E,)
            if text.ndim != 1 or text.shape != video.shape or not text.size:
                raise ValueError(f"text_emb {text.shape} and video_emb {video.shape} must be two (E,) vectors "
                                 "of the same size")
            if np.isfinite(text).all() and np.isfinite(video).all():
                text_emb, video_emb = text, video
            else:
                logger.warning("guard %s: non-finite scorer embedding for video %s dropped; check the scorer",
                               self.checkpoint, video_sha256[:12])
                text_emb = video_emb = None
        if siglip is not None:
            siglip = float(siglip)
            if not math.isfinite(siglip):
                logger.warning("guard %s: non-finite SigLIP score for video %s dropped; check the scorer",
                               self.checkpoint, video_sha256[:12])
                siglip = None
        return _Row(caption, key, content_key(caption), degenerate in LOOP_KINDS, text_emb, video_emb, siglip)

    def _check_dim(self, row: _Row) -> None:
        if row.text_emb is not None and self._emb_rows and row.text_emb.shape[0] != self._emb_dim:
            raise ValueError(f"embedding size {row.text_emb.shape[0]} does not match the window's {self._emb_dim}: the "
                             f"scorer changed under checkpoint {self.checkpoint!r}; reset() its guard first")

    def _count(self, row: _Row, sign: int) -> None:
        """Add (sign=1) or remove (sign=-1) one row from the running counts."""
        before = self._key_counts[row.key]
        after = before + sign
        self._singletons += (after == 1) - (before == 1)
        if after:
            self._key_counts[row.key] = after
        else:
            del self._key_counts[row.key]
        self._content_counts[row.content] += sign
        if not self._content_counts[row.content]:
            del self._content_counts[row.content]
        self._loops += sign * row.loop
        if row.siglip is not None:
            self._siglip_sum += sign * row.siglip
            self._siglip_rows += sign
        if row.text_emb is not None:
            self._emb_rows += sign
            self._emb_dim = row.text_emb.shape[0]
            if self._vendi is None or self._vendi.dim != self._emb_dim:
                self._vendi = RunningVendi(self._emb_dim)
            (self._vendi.add if sign > 0 else self._vendi.remove)(row.text_emb)

    def _advance(self, sha: str, row: _Row, score: bool = True) -> bool:
        """Put the row in the window (refresh or append, evicting the oldest); True if a recompute is due.

        score=False skips the Vendi scoring beat (restore, for rows whose score is overwritten before it counts).
        """
        old = self._rows.pop(sha, None)
        if old is not None:
            self._count(old, -1)
        self._rows[sha] = row
        self._count(row, +1)
        if len(self._rows) > self.settings.window:
            _, evicted = self._rows.popitem(last=False)
            self._count(evicted, -1)
        self._observations += 1
        if self._observations % self.settings.window == 0:  # wash out float drift, on a deterministic beat
            self._siglip_sum = math.fsum(r.siglip for r in self._rows.values() if r.siglip is not None)
            if self._vendi is not None:
                self._vendi.reset(np.stack([r.text_emb for r in self._rows.values() if r.text_emb is not None])
                                  if self._emb_rows else None)   # (m, E)
        warm_up_ends = old is None and len(self._rows) == self.settings.min_captions
        if warm_up_ends or self._observations % RunningVendi.SCORE_EVERY == 0:
            if score:
                self._vendi_score = self._vendi.score() if self._emb_rows else None
            elif self._vendi is not None:
                self._vendi.flush()   # same float sums as observing: restore's figures equal bit for bit
        return warm_up_ends or self._observations % self._every == 0

    def _recompute(self) -> None:
        """Full metrics over the window: clustering and modes (diversity_report), grounding."""
        started = time.perf_counter()
        rows = list(self._rows.values())
        report = diversity_report([r.caption for r in rows], keys=[r.key for r in rows], top_k=self.settings.top_modes,
                                  near_dup_threshold=self.settings.thresholds.near_dup_threshold,
                                  with_self_bleu=False, with_distinct_n=False, cache=self._similarities,
                                  content_keys=[r.content for r in rows],
                                  degenerate=[LOOP_KINDS[0] if r.loop else None for r in rows])
        scored = [r for r in rows if r.text_emb is not None]
        if len(scored) >= max(2, self.settings.min_captions):
            with _one_blas_thread():
                r1, margin = grounding(np.stack([r.text_emb for r in scored]),    # (m, E)
                                       np.stack([r.video_emb for r in scored]))   # (m, E)
            report = replace(report, grounding_r1=r1, grounding_margin=margin)
        self._report, self._report_at = report, self._observations
        logger.debug("guard %s: recomputed %d captions in %.1f ms", self.checkpoint, len(rows),
                     1e3 * (time.perf_counter() - started))

    # ------------------------------------------------------------------ verdict (lock held)

    def _step(self, sha: str, row: _Row) -> None:
        """Observe one row: window, recompute when due, evaluate, publish."""
        if self._advance(sha, row):
            self._recompute()
        newly: list[str] = []
        if len(self._rows) >= self.settings.min_captions:
            newly = self._evaluate()
        self._state = self._publish(newly)

    def _evaluate(self) -> list[str]:
        """Apply the rules with hysteresis; returns the rules that tripped on this evaluation."""
        was = self._status()
        failing = tripped_rules(self._live_report(), self.settings.thresholds)
        newly = []
        for rule in RULES:
            if rule in failing:
                if rule not in self._tripped:
                    newly.append(rule)
                self._tripped[rule] = 0
            elif rule in self._tripped:
                self._tripped[rule] += 1
                if self._tripped[rule] >= self.settings.clear_after:
                    del self._tripped[rule]
        now = self._status()
        if now == was or self._replaying:
            pass
        elif now == "collapsed":
            top = self._report.modes[0] if self._report and self._report.modes else None
            logger.warning("guard %s: COLLAPSED (%s) over %d videos; top mode %.0f%%: %r", self.checkpoint,
                           ", ".join(self._tripped), len(self._rows), 100 * top.share if top else 0.0,
                           top.representative if top else None)
        else:
            logger.info("guard %s: collapse cleared after %d passing evaluations", self.checkpoint,
                        self.settings.clear_after)
        return newly

    def _status(self) -> str:
        if len(self._rows) < self.settings.min_captions:
            return "warming_up"
        return "collapsed" if self._tripped else "ok"

    def _live_report(self) -> DiversityReport:
        """The last full report with the live exact counts (they change on every observation) swapped in."""
        if self._report is None:  # cannot happen after warm-up (its end forces a recompute); be safe anyway
            self._recompute()
        n = len(self._rows)
        return replace(self._report, n=n, unique=len(self._key_counts), unique_ratio=len(self._key_counts) / n,
                       repeat_probability=1.0 - self._singletons / n,
                       content_unique_ratio=len(self._content_counts) / n, degenerate_share=self._loops / n,
                       vendi_score=self._vendi_score)

    def _publish(self, newly: list[str]) -> GuardState:
        n = len(self._rows)
        report = self._report
        clears_in = {rule: self.settings.clear_after - passes for rule, passes in self._tripped.items() if passes}
        return GuardState(
            checkpoint=self.checkpoint,
            status=self._status(),
            window_captions=n,
            unique_ratio=len(self._key_counts) / n if n else None,
            near_unique_ratio=jsonable(report.near_unique_ratio) if report else None,
            top_mode_share=jsonable(report.top_mode_share) if report else None,
            repeat_probability=1.0 - self._singletons / n if n else None,
            siglip_mean=jsonable(self._siglip_sum / self._siglip_rows) if self._siglip_rows else None,
            grounding_r1=jsonable(report.grounding_r1) if report else None,
            grounding_margin=jsonable(report.grounding_margin) if report else None,
            content_unique_ratio=len(self._content_counts) / n if n else None,
            vendi_score=jsonable(self._vendi_score) if self._emb_rows else None,
            degenerate_share=self._loops / n if n else None,
            tripped=[rule for rule in RULES if rule in self._tripped],
            newly_tripped=newly,
            modes=[{"representative": m.representative, "count": m.count, "share": float(m.share),
                    "variants": m.variants} for m in report.modes] if report else [],
            thresholds=asdict(self.settings.thresholds),
            metrics_age=self._observations - self._report_at if report else 0,
            clears_in=clears_in,
        )


class GuardRegistry:
    """One Guard per checkpoint name, created on first use with the shared settings. Thread-safe."""

    def __init__(self, settings: GuardSettings | None = None):
        self.settings = settings if settings is not None else GuardSettings()
        self._guards: dict[str, Guard] = {}
        self._lock = threading.Lock()

    def get(self, checkpoint: str) -> Guard:
        with self._lock:
            guard = self._guards.get(checkpoint)
            if guard is None:
                guard = self._guards[checkpoint] = Guard(checkpoint, self.settings)
            return guard

    def configure(self, checkpoint: str, thresholds: dict[str, float]) -> Guard:
        """A fresh, empty Guard for ``checkpoint`` whose thresholds differ from the shared ones by ``thresholds``
        (a checkpoint's own ``guard`` section). Call before restoring its window.

        Example: configure("demo", {"near_dup_threshold": 0.98}) -> Guard with thresholds.near_dup_threshold 0.98.
        """
        check_threshold_names(thresholds)
        settings = replace(self.settings, thresholds=replace(self.settings.thresholds, **thresholds))
        with self._lock:
            guard = self._guards[checkpoint] = Guard(checkpoint, settings)
            return guard


__all__ = ["STATUSES", "Guard", "GuardRegistry", "GuardSettings", "GuardState"]
