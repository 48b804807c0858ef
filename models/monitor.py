"""Watch a training run's captions and say when to stop: the guard's rules applied at every evaluation.

    monitor = DiversityMonitor(generate, probe_videos, ids=probe_ids, out_dir="runs/x")   # patience 4
    result = monitor.evaluate(epoch=3)        # captions the probe set, writes runs/x/captions-epoch-3.jsonl
    result.metrics()                          # {"capguard/unique_ratio": 0.04, ..., "capguard/collapsed": 1.0}
    if result.should_stop: ...                # `patience` collapsed, non-recovering evaluations in a row; .reason says why

The field report's lesson is that diversity monitoring caught the collapse at epoch 1 while SigLIP kept
rising; this module is that monitor, framework-free. ``capguard train`` calls ``observe`` with the captions
its validation already generated; ``capguard.callbacks`` wraps ``evaluate`` for the transformers Trainer
and for Lightning. Figures and verdicts come from capguard.models.diversity (``diversity_report``,
``tripped_rules``), the same functions as the server's guard and the evaluation reports, and each
evaluation's captions are written in the caption-file format (capguard.models.captions_file), so
``capguard evaluate --captions runs/x/captions-epoch-*.jsonl`` reports the run afterwards.

When to stop. The guard's lines are drawn for a model being served; a model being trained sits below them
for a while even when the run is healthy. Recorded ``capguard train`` runs (tests/data/train-runs, 97
validation videos): the MLP-2L recipes, which end healthy, write 40, 23, 9 distinct captions in their
projector-only stage 1 (falling, as the projector first lands on the frozen LM's favourite sentences), then
climb once stage 2 fine-tunes the LM (12 or 14, then 23-33, ...): every one of their first nine epochs
breaks a guard rule. The C-Abstractor recipe writes 4, 1, 2, 2, 2 with one caption cluster covering all 97
videos, and the field report's run 9, 6, 4, 1, 4, 6. What separates them is not the level but whether the
run is getting out of it. So an evaluation counts towards ``patience`` only when it is collapsed (a guard
rule tripped) **and not recovering**: no collapse figure (``RECOVERY_FIGURES``: unique, near-unique and
content-unique ratios, top-mode share, grounding R@1) improved on the previous evaluation's by
``min_recovery``. A healthy or recovering evaluation resets the streak; the first evaluation is the
baseline (nothing to compare with) and never counts.

The defaults. ``min_recovery`` 0.05 (5 videos of 97) sits above a collapsed run's epoch-to-epoch jitter (the
C-Abstractor's stage 1 moves by at most 0.01 once settled, the field report's run by 3 of 97). ``patience``
4: the MLP-2L runs fall for two evaluations and their first stage-2 epoch, still in LR warm-up, climbs
only a little (top-mode share 0.55 -> 0.33 in one run, +5 of 97 unique in its rerun with another thread
count: 0.002 above the margin), while the next one jumps (+0.11 to +0.45). Patience 3 would hang the healthy
runs on that one weak epoch; 4 waits for the jump and stops a run that stays down: the C-Abstractor at
epoch 5 of 15 (the end of its flat stage 1), the field report's run at epoch 5 of 6. The stop reason names
the tripped rules and the figures' trend over the streak, and says when SigLIP rose while diversity fell
(the field report's trap: the generic caption fits every video, so SigLIP rewards it). Limit: a run whose
diversity swings by ``min_recovery`` or more every other evaluation is never stopped; collapse does not
look like that in any recorded run.

``generate(videos) -> captions``: whatever the user's model needs; it gets the probe set exactly as given
(paths, frame arrays, dataset rows) and returns one caption per video, either strings or objects with a
``caption`` attribute and, optionally, ``score`` (SigLIP), ``text_emb`` and ``video_emb`` (E,) for
grounding: capguard's own ``CaptionOutput``. ``stack_generate`` and ``captioner_generate`` make one for a
loaded ``CaptionStack`` or a ``Captioner`` being trained.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from capguard.models.captions_file import write_captions_file
from capguard.models.diversity import DiversityReport, diversity_report
from capguard.models.rules import GuardThresholds, explain_rule, tripped_rules

log = logging.getLogger(__name__)

Generate = Callable[[Sequence], Sequence]   # probe videos -> one caption (str or CaptionOutput-like) each
# figures logged per evaluation: DiversityReport fields (nan/None ones are left out)
LOGGED = ("unique_ratio", "near_unique_ratio", "top_mode_share", "repeat_probability", "distinct_2",
          "grounding_r1")
# How collapsed a probe set is: DiversityReport figure -> +1 when higher is less collapsed, -1 when lower is.
# Recovery is judged on these. degenerate_share is left out: a decoder that stops looping has not diversified.
RECOVERY_FIGURES = {"unique_ratio": 1, "near_unique_ratio": 1, "content_unique_ratio": 1, "top_mode_share": -1,
                    "grounding_r1": 1}
MIN_RECOVERY = 0.05   # 5 videos of the field report's 97: above a collapsed run's jitter (see the module doc)


@dataclass
class MonitorResult:
    """One evaluation of the probe set."""

    index: int                      # 1-based count of evaluations
    epoch: int | None
    step: int | None
    captions: list[str]             # one per probe video, in probe order
    report: DiversityReport
    tripped: list[str]              # guard rules broken, in RULES order; [] = healthy
    siglip_mean: float | None       # mean given score; None when generate gives none
    streak: int                     # counted evaluations in a row (collapsed, not recovering), this one included
    should_stop: bool               # streak reached patience
    reason: str | None              # why training should stop (names the rules, the figures and their trend)
    path: Path | None               # the captions file written, if any
    # RECOVERY_FIGURES improvement on the previous evaluation (positive = less collapsed); {} for the first
    changes: dict[str, float] = field(default_factory=dict)
    recovering: bool | None = None  # some figure improved by min_recovery; None: the first (baseline) evaluation
    counted: bool = False           # counted towards patience: collapsed, past ignore_first, not recovering
    # SigLIP mean rose on the previous evaluation's while most collapse figures got worse: the field report's trap
    siglip_up_diversity_down: bool = False

    @property
    def status(self) -> str:
        return "collapsed" if self.tripped else "ok"

    def metrics(self, prefix: str = "capguard/") -> dict[str, float]:
        """Finite figures as plain floats for a logger: {prefix + name: value}; collapsed is 0/1."""
        values = {name: getattr(self.report, name) for name in LOGGED}
        values |= {"siglip_mean": self.siglip_mean, "collapsed": float(bool(self.tripped)),
                   "collapsed_streak": float(self.streak),
                   "recovering": None if self.recovering is None else float(self.recovering),
                   "siglip_up_diversity_down": float(self.siglip_up_diversity_down)}
        return {prefix + k: float(v) for k, v in values.items() if v is not None and math.isfinite(v)}


@dataclass
class DiversityMonitor:
    """Caption a fixed probe set at each evaluation, judge it by the guard's rules, stop after `patience`.

    patience: evaluations in a row that are collapsed and not recovering before ``should_stop`` (a healthy
    or a recovering one resets the count; the first is the baseline and never counts); None never stops
    (figures and files only). Default 4: a run may dip for two evaluations and take one more to turn (see
    the module doc). min_recovery: how much one of ``RECOVERY_FIGURES`` must improve on the previous evaluation for
    this one to count as recovering (ratios of the probe set; 0.05 = 5 videos of 97). ignore_first:
    evaluations not counted towards patience on top of that (a warm-up; evaluation ignore_first + 1 is then
    compared with evaluation ignore_first). Default 0: the field report's run was collapsed from epoch 1.
    """

    generate: Generate | None                     # None: captions come through ``observe`` only
    videos: Sequence                              # the probe set, passed to generate as given
    ids: Sequence[str] | None = None              # one id per probe video (default "0", "1", ...)
    references: Sequence[str | None] | None = None
    video_paths: Sequence[str | os.PathLike | None] | None = None   # written as video_path when known
    out_dir: str | os.PathLike | None = None      # where captions-epoch-N.jsonl go; None: not written
    patience: int | None = 4
    ignore_first: int = 0
    min_recovery: float = MIN_RECOVERY
    thresholds: GuardThresholds = field(default_factory=GuardThresholds)
    history: list[MonitorResult] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.videos)
        if n < 2:
            raise ValueError(f"the probe set has {n} video(s); diversity needs several (30+ for the guard's "
                             "verdicts to mean much; the field report used 97)")
        for name in ("ids", "references", "video_paths"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"{name} has {len(value)} entries for {n} probe videos")
        self.ids = [str(i) for i in (self.ids if self.ids is not None else range(n))]
        if len(set(self.ids)) != n:
            raise ValueError("probe ids repeat; give each probe video its own id")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be at least 1 (or None to never stop), got {self.patience}")
        if self.ignore_first < 0:
            raise ValueError(f"ignore_first must be 0 or more, got {self.ignore_first}")
        if not 0.0 < self.min_recovery <= 1.0:
            raise ValueError(f"min_recovery is a share of the probe set in (0, 1], got {self.min_recovery}; "
                             f"{MIN_RECOVERY} is the default")

    def evaluate(self, epoch: int | None = None, step: int | None = None, write: bool = True) -> MonitorResult:
        """Caption the probe set with ``generate`` and judge it (``observe``)."""
        if self.generate is None:
            raise ValueError("this DiversityMonitor has no generate function; pass one, or call observe(captions)")
        outputs = list(self.generate(self.videos))
        if len(outputs) != len(self.videos):
            raise ValueError(f"generate returned {len(outputs)} captions for {len(self.videos)} probe videos")
        captions = [o if isinstance(o, str) else getattr(o, "caption", None) for o in outputs]
        bad = next((i for i, c in enumerate(captions) if not isinstance(c, str)), None)
        if bad is not None:
            raise TypeError(f"generate returned {type(outputs[bad]).__name__} for probe video {bad}; return str "
                            "captions (or objects with a .caption str)")
        scores = [getattr(o, "score", None) for o in outputs]
        text = [getattr(o, "text_emb", None) for o in outputs]
        video = [getattr(o, "video_emb", None) for o in outputs]
        grounded = all(t is not None for t in text) and all(v is not None for v in video)
        return self.observe(captions, scores=scores, text_emb=np.stack(text) if grounded else None,
                            video_emb=np.stack(video) if grounded else None, epoch=epoch, step=step, write=write)

    def observe(self, captions: Sequence[str], *, scores: Sequence[float | None] | None = None,
                text_emb: np.ndarray | None = None, video_emb: np.ndarray | None = None,
                epoch: int | None = None, step: int | None = None, write: bool = True) -> MonitorResult:
        """Judge captions of the probe set (probe order) already generated: figures, rules, recovery, streak, file.

        text_emb, video_emb: (n, E) scorer embeddings (caption i / probe video i) for grounding R@1.
        write: False on the ranks of a distributed run that are not rank 0 (one file per evaluation).
        """
        if len(captions) != len(self.videos):
            raise ValueError(f"{len(captions)} captions for {len(self.videos)} probe videos")
        report = diversity_report(list(captions), text_emb, video_emb, with_self_bleu=False,
                                  near_dup_threshold=self.thresholds.near_dup_threshold)
        tripped = tripped_rules(report, self.thresholds)
        index = len(self.history) + 1
        previous = self.history[-1] if self.history else None
        changes = improvements(previous.report, report) if previous else {}
        recovering = None if previous is None else any(d >= self.min_recovery - 1e-9 for d in changes.values())
        counted = bool(tripped) and index > self.ignore_first and recovering is False
        streak = previous.streak + 1 if counted else 0      # counted implies a previous evaluation
        finite = [float(s) for s in (scores or []) if s is not None and math.isfinite(s)]
        siglip = float(np.mean(finite)) if finite else None
        trap = (previous is not None and siglip is not None and previous.siglip_mean is not None
                and siglip > previous.siglip_mean and _mostly_worse(changes))
        should_stop = self.patience is not None and streak >= self.patience
        path = None
        if write and self.out_dir is not None:
            path = self._write(captions, scores, epoch, step, index)
        result = MonitorResult(index, epoch, step, list(captions), report, tripped, siglip, streak, should_stop,
                               None, path, changes, recovering, counted, trap)
        if should_stop:
            result.reason = self._reason(result)
        self.history.append(result)
        log.info("diversity at %s: %d/%d unique (%.2f) | near %.2f | top mode %.2f | R@1 %s | %s%s",
                 _when(result), report.unique, report.n, report.unique_ratio, report.near_unique_ratio,
                 report.top_mode_share, "-" if report.grounding_r1 is None else f"{report.grounding_r1:.2f}",
                 ",".join(tripped) or "healthy",
                 "" if not tripped or recovering is None else
                 " (recovering)" if recovering else f" (not recovering: {streak}/{self.patience or '-'})")
        if result.reason:
            log.warning("%s", result.reason)
        return result

    def _reason(self, result: MonitorResult) -> str:
        """Why to stop: the streak, the rules tripped now, and the trend from the baseline before the streak."""
        report, tripped = result.report, result.tripped
        base = self.history[result.index - result.streak - 1]   # the evaluation before the streak's first
        top = report.modes[0].representative if report.modes else ""
        trend = ", ".join(f"{name} {getattr(base.report, name):.2f} -> {getattr(report, name):.2f}"
                          for name in RECOVERY_FIGURES if _finite(getattr(base.report, name))
                          and _finite(getattr(report, name)))
        siglip = ""
        if base.siglip_mean is not None and result.siglip_mean is not None:
            siglip = f"; SigLIP {base.siglip_mean:.3f} -> {result.siglip_mean:.3f}"
        counted = self.history[base.index:] + [result]                 # the streak's evaluations, oldest first
        traps = [r for r in counted if r.siglip_up_diversity_down]
        if traps:
            siglip += (f"; SigLIP rose while diversity fell at {', '.join(_when(r) for r in traps)}: the field "
                       f"report's trap (a generic caption fits every video, so SigLIP rewards it)")
        return (f"capguard: mode collapse, stopping training: {result.streak} evaluations in a row collapsed and "
                f"not recovering (patience {self.patience}; recovering = a collapse figure up {self.min_recovery} "
                f"on the previous evaluation); at {_when(result)} {report.unique}/{report.n} captions are distinct "
                f"and the guard rules {', '.join(tripped)} tripped "
                f"({'; '.join(explain_rule(report, self.thresholds, r) for r in tripped)}); "
                f"trend {_when(base)} -> {_when(result)}: {trend}{siglip}; top mode: {top!r}")

    def _write(self, captions, scores, epoch, step, index) -> Path:
        out = Path(self.out_dir)
        name = f"captions-epoch-{epoch}.jsonl" if epoch is not None else (
            f"captions-step-{step}.jsonl" if step is not None else f"captions-eval-{index}.jsonl")
        paths = self.video_paths or [None] * len(captions)
        rows = [{"video": vid, "caption": c, "siglip": s, "reference": ref,
                 "video_path": os.path.relpath(Path(p).resolve(), out.resolve()) if p is not None else None}
                for vid, c, s, ref, p in zip(self.ids, captions, scores or [None] * len(captions),
                                             self.references or [None] * len(captions), paths, strict=True)]
        return write_captions_file(out / name, rows)


def improvements(before: DiversityReport, after: DiversityReport) -> dict[str, float]:
    """How much less collapsed ``after`` is than ``before`` on each of ``RECOVERY_FIGURES`` both have.

    Positive = better (a ratio up, the top-mode share down). Example: unique_ratio 0.09 -> 0.12 and
    top_mode_share 0.55 -> 0.33 -> {"unique_ratio": 0.03, "top_mode_share": 0.22, ...}.
    """
    return {name: sign * (getattr(after, name) - getattr(before, name)) for name, sign in RECOVERY_FIGURES.items()
            if _finite(getattr(before, name)) and _finite(getattr(after, name))}


def _mostly_worse(changes: dict[str, float]) -> bool:
    """More collapse figures got worse than better (``improvements`` output)."""
    return sum(d < 0 for d in changes.values()) > sum(d > 0 for d in changes.values())


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


def _when(result: MonitorResult) -> str:
    return (f"epoch {result.epoch}" if result.epoch is not None else
            f"step {result.step}" if result.step is not None else f"evaluation {result.index}")


# ---------------------------------------------------------------------------------------------------
# generate functions for capguard's own models


def stack_generate(stack, batch_size: int = 16) -> Generate:
    """generate() for a loaded CaptionStack: probe videos are (T, H, W, 3) uint8 arrays or video paths
    (decoded on every call; pass arrays to decode once); returns CaptionOutputs (SigLIP and grounding
    when the stack has a scorer)."""
    from capguard.models.video import sample_frames

    def generate(videos: Sequence) -> list:
        outputs = []
        for start in range(0, len(videos), batch_size):
            frames = [v if isinstance(v, np.ndarray) else
                      sample_frames(v, stack.config.num_frames, max_side=stack.frame_side).frames
                      for v in videos[start:start + batch_size]]
            outputs += stack.caption(frames)[0]
        return outputs
    return generate


def captioner_generate(captioner, generation=None, batch_size: int = 16) -> Generate:
    """generate() for a Captioner being trained: probe videos are (T, H, W, 3) uint8 arrays; greedy
    captions under torch.inference_mode, with the modules' train/eval mode restored afterwards."""
    import torch

    from capguard.models.config import GenerationConfig
    from capguard.models.encoder import frames_to_tensor

    gen = generation or GenerationConfig(max_new_tokens=40)

    def generate(videos: Sequence) -> list[str]:
        was_training = captioner.training
        captioner.eval()
        try:
            captions = []
            with torch.inference_mode():
                for start in range(0, len(videos), batch_size):
                    batch = videos[start:start + batch_size]
                    frames = torch.cat([frames_to_tensor(v) for v in batch]).to(captioner.device)  # (sum T, H, W, 3)
                    pixels = captioner.encoder.preprocess(frames)                                 # (sum T, 3, S, S)
                    blocks = captioner.visual_tokens(pixels.to(next(captioner.projector.parameters()).dtype),
                                                     [len(v) for v in batch])
                    captions += [g.text for g in captioner.generate(captioner.project(blocks), gen)]
            return captions
        finally:
            captioner.train(was_training)
    return generate


__all__ = ["LOGGED", "MIN_RECOVERY", "RECOVERY_FIGURES", "DiversityMonitor", "MonitorResult", "captioner_generate",
           "improvements", "stack_generate"]
