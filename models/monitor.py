"""Watch a training run's captions and say when to stop: the guard's rules applied at every evaluation.

    monitor = DiversityMonitor(generate, probe_videos, ids=probe_ids, out_dir="runs/x", patience=2)
    result = monitor.evaluate(epoch=3)        # captions the probe set, writes runs/x/captions-epoch-3.jsonl
    result.metrics()                          # {"capguard/unique_ratio": 0.04, ..., "capguard/collapsed": 1.0}
    if result.should_stop: ...                # `patience` collapsed evaluations in a row; result.reason says why

The field report's lesson is that diversity monitoring caught the collapse at epoch 1 while SigLIP kept
rising; this module is that monitor, framework-free. ``capguard train`` calls ``observe`` with the captions
its validation already generated; ``capguard.callbacks`` wraps ``evaluate`` for the transformers Trainer
and for Lightning. Figures and verdicts come from capguard.models.diversity (``diversity_report``,
``tripped_rules``), the same functions as the server's guard and the evaluation reports, and each
evaluation's captions are written in the caption-file format (capguard.models.captions_file), so
``capguard evaluate --captions runs/x/captions-epoch-*.jsonl`` reports the run afterwards.

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
    streak: int                     # collapsed evaluations in a row, this one included
    should_stop: bool               # streak reached patience
    reason: str | None              # why training should stop (names the rules and the figures)
    path: Path | None               # the captions file written, if any

    @property
    def status(self) -> str:
        return "collapsed" if self.tripped else "ok"

    def metrics(self, prefix: str = "capguard/") -> dict[str, float]:
        """Finite figures as plain floats for a logger: {prefix + name: value}; collapsed is 0/1."""
        values = {name: getattr(self.report, name) for name in LOGGED}
        values |= {"siglip_mean": self.siglip_mean, "collapsed": float(bool(self.tripped)),
                   "collapsed_streak": float(self.streak)}
        return {prefix + k: float(v) for k, v in values.items() if v is not None and math.isfinite(v)}


@dataclass
class DiversityMonitor:
    """Caption a fixed probe set at each evaluation, judge it by the guard's rules, stop after `patience`.

    patience: collapsed evaluations in a row before ``should_stop`` (a healthy one resets the count);
    None never stops (figures and files only). ignore_first: evaluations not counted towards patience
    (a model that has not yet learned to caption writes the same few words for everything; the field
    report's run was already collapsed at epoch 1, so the default counts from the first).
    """

    generate: Generate | None                     # None: captions come through ``observe`` only
    videos: Sequence                              # the probe set, passed to generate as given
    ids: Sequence[str] | None = None              # one id per probe video (default "0", "1", ...)
    references: Sequence[str | None] | None = None
    video_paths: Sequence[str | os.PathLike | None] | None = None   # written as video_path when known
    out_dir: str | os.PathLike | None = None      # where captions-epoch-N.jsonl go; None: not written
    patience: int | None = 2
    ignore_first: int = 0
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
        """Judge captions of the probe set (probe order) already generated: figures, rules, streak, file.

        text_emb, video_emb: (n, E) scorer embeddings (caption i / probe video i) for grounding R@1.
        write: False on the ranks of a distributed run that are not rank 0 (one file per evaluation).
        """
        if len(captions) != len(self.videos):
            raise ValueError(f"{len(captions)} captions for {len(self.videos)} probe videos")
        report = diversity_report(list(captions), text_emb, video_emb, with_self_bleu=False,
                                  near_dup_threshold=self.thresholds.near_dup_threshold)
        tripped = tripped_rules(report, self.thresholds)
        index = len(self.history) + 1
        counted = index > self.ignore_first
        previous = self.history[-1].streak if self.history else 0
        streak = previous + 1 if tripped and counted else 0
        finite = [float(s) for s in (scores or []) if s is not None and math.isfinite(s)]
        siglip = float(np.mean(finite)) if finite else None
        should_stop = self.patience is not None and streak >= self.patience
        reason = self._reason(report, tripped, streak, epoch, step) if should_stop else None
        path = None
        if write and self.out_dir is not None:
            path = self._write(captions, scores, epoch, step, index)
        result = MonitorResult(index, epoch, step, list(captions), report, tripped, siglip, streak, should_stop,
                               reason, path)
        self.history.append(result)
        when = f"epoch {epoch}" if epoch is not None else f"step {step}" if step is not None else f"#{index}"
        log.info("diversity at %s: %d/%d unique (%.2f) | near %.2f | top mode %.2f | R@1 %s | %s", when,
                 report.unique, report.n, report.unique_ratio, report.near_unique_ratio, report.top_mode_share,
                 "-" if report.grounding_r1 is None else f"{report.grounding_r1:.2f}",
                 ",".join(tripped) or "healthy")
        if reason:
            log.warning("%s", reason)
        return result

    def _reason(self, report: DiversityReport, tripped: list[str], streak: int, epoch, step) -> str:
        when = f"epoch {epoch}" if epoch is not None else f"step {step}"
        top = report.modes[0].representative if report.modes else ""
        return (f"capguard: mode collapse, stopping training: {streak} collapsed evaluation(s) in a row "
                f"(patience {self.patience}); at {when} {report.unique}/{report.n} captions are distinct and "
                f"the guard rules {', '.join(tripped)} tripped "
                f"({'; '.join(explain_rule(report, self.thresholds, r) for r in tripped)}); "
                f"top mode: {top!r}")

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


__all__ = ["LOGGED", "DiversityMonitor", "MonitorResult", "captioner_generate", "stack_generate"]
