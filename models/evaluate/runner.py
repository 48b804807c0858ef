"""Running checkpoints over a data set: decode each video once, caption it with every checkpoint, and
rewrite report.json, captions.jsonl and report.html atomically after each checkpoint.

Cost: each video is decoded once per (frame count, frame size), normally once, and the frames are reused
by every checkpoint; checkpoints load one at a time through one ComponentCache, so epochs sharing an
encoder or LLM load it once, and components private to a checkpoint are dropped after it."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from capguard.models.config import MANIFEST_NAME, CheckpointConfig, GenerationConfig
from capguard.models.decoding import MAX_SEED, DecodingRequest
from capguard.models.degenerate import judge
from capguard.models.evaluate.dataset import Dataset, VideoItem, load_dataset
from capguard.models.evaluate.metrics import is_finite, metric_notes
from capguard.models.evaluate.rows import build_report, checkpoint_row
from capguard.models.rules import GuardThresholds

log = logging.getLogger(__name__)


ProgressCallback = Callable[[int, int], None]   # (videos captioned so far, videos to caption in all)
FrameLoader = Callable[[Path, int, int], np.ndarray]   # (path, num_frames, max_side) -> (T, H, W, 3) uint8


def _sample(path: Path, num_frames: int, max_side: int) -> np.ndarray:
    from capguard.models.video import VideoLimits, sample_frames

    return sample_frames(path, num_frames, VideoLimits(), max_side=max_side).frames


@dataclass
class _FrameStore:
    """Decoded frames per (num_frames, max_side), kept for the next checkpoint while they fit in max_bytes."""

    loader: FrameLoader
    max_bytes: int                                           # beyond this, frames are decoded again if needed
    frames: dict = field(default_factory=dict)               # (num_frames, side, item index) -> (T, H, W, 3)
    failures: dict = field(default_factory=dict)             # item index -> {"code", "message"}
    nbytes: int = 0
    decode_s: float = 0.0                                    # time spent decoding, for the run metadata
    warned: bool = False

    def get(self, index: int, item: VideoItem, num_frames: int, side: int) -> np.ndarray | None:
        if index in self.failures:
            return None
        key = (num_frames, side, index)
        if key in self.frames:
            return self.frames[key]
        from capguard.models.video import VideoError

        start = time.perf_counter()
        try:
            frames = self.loader(item.path, num_frames, side)
        except (VideoError, OSError) as exc:
            self.failures[index] = {"code": getattr(exc, "code", "io_error"), "message": str(exc)}
            log.warning("skipping %s: %s", item.rel, exc)
            return None
        finally:
            self.decode_s += time.perf_counter() - start
        if self.nbytes + frames.nbytes <= self.max_bytes:
            self.frames[key] = frames
            self.nbytes += frames.nbytes
        elif not self.warned:
            self.warned = True
            log.warning("decoded frames exceed %.1f GiB; later checkpoints decode the remaining videos again",
                        self.max_bytes / 2**30)
        return frames


class Evaluator:
    """One report being built: the data set, its decoded frames, the loaded components and the rows so far.

    ``add(checkpoint_dir)`` captions every video with that checkpoint, appends its row and rewrites the
    outputs; ``evaluate`` and ``watch`` are loops around it (the server can drive it the same way).
    """

    def __init__(self, dataset: Dataset, out_dir: str | os.PathLike, *, num_frames: int | None = None,
                 batch_size: int = 16, device: str = "auto", thresholds: GuardThresholds | None = None,
                 cache=None, progress_callback: ProgressCallback | None = None, progress_bar: bool = True,
                 frame_loader: FrameLoader | None = None, expected_checkpoints: int = 1,
                 max_new_tokens: int | None = None, max_frame_bytes: int = 4 * 2**30,
                 decoding: DecodingRequest | None = None):
        from capguard.models.stack import ComponentCache

        for name, value in (("batch_size", batch_size), ("num_frames", num_frames), ("max_new_tokens", max_new_tokens)):
            if value is not None and value < 1:   # None: the checkpoint's own; 0 is an error, not "default"
                raise ValueError(f"{name} must be at least 1, got {value}")
        self.dataset, self.out_dir = dataset, Path(out_dir)
        self.num_frames, self.batch_size, self.device = num_frames, batch_size, device
        self.max_new_tokens = max_new_tokens     # None: each checkpoint's generation default
        # decoding fields applied to each checkpoint's own defaults; a given seed makes video i use seed + i
        # (its own stream, so a run is reproducible and videos do not share their draws)
        self.decoding = decoding if decoding is not None else DecodingRequest()
        self.decoding.check()
        self.thresholds = thresholds   # None: the defaults updated by each checkpoint's guard section
        self.cache = cache if cache is not None else ComponentCache()
        self.progress_callback, self.progress_bar = progress_callback, progress_bar
        self.frames = _FrameStore(frame_loader or _sample, max_frame_bytes)
        self.expected = max(expected_checkpoints, 1)
        self.rows: list[dict] = []
        self.records: list[dict] = []        # captions.jsonl lines
        self.extra_warnings: list[dict] = []
        self.created = _now()
        self.started = time.perf_counter()
        self.device_used: str | None = None   # what "auto" became, e.g. "cuda:0 (bfloat16)"
        self.out_dir.mkdir(parents=True, exist_ok=True)

    # -- one checkpoint ----------------------------------------------------------------------------

    def add(self, checkpoint_dir: str | os.PathLike, keep: Iterable[Path] = (),
            name: str | None = None) -> dict:
        """Caption the data set with one checkpoint, append its row, rewrite the outputs; returns the row.

        keep: component paths that checkpoints still to come use; they stay cached even if they live in
        this checkpoint's directory (everything else inside it is dropped from the cache afterwards).
        name: the row's display name (default: the checkpoint's own name, "parent/name" if already taken).
        """
        import torch

        from capguard.models.stack import load_stack

        directory = Path(checkpoint_dir)
        start = time.perf_counter()
        stack = load_stack(directory, device=self.device, cache=self.cache, with_scorer=True)
        self.device_used = f"{stack.device} ({str(stack.dtype).removeprefix('torch.')})"
        name = self._unique_name(name or stack.name, directory)
        if stack.scorer is None:
            self.extra_warnings.append({"code": "no_scorer", "message": (
                f"{name} has no scorer in its {MANIFEST_NAME}: SigLIP and grounding R@1 are not computed.")})
        thresholds = self.thresholds or replace(GuardThresholds(), **stack.config.guard)
        num_frames = stack.config.num_frames if self.num_frames is None else self.num_frames
        items = self.dataset.items
        kept: list[int] = []
        seeds: list[int | None] = []   # per caption: the seed it was sampled with (None: not sampled)
        captions: list[str] = []
        scores: list[float | None] = []
        kinds: list[str | None] = []   # degeneration kind per caption, judged with its token count
        finishes: list[str | None] = []   # why each caption ended: "stop", "length", "repetition"
        text_emb, video_emb = [], []
        stages = Counter()
        bar = tqdm(total=len(items), desc=name, unit="video", disable=not self.progress_bar)
        for first in range(0, len(items), self.batch_size):
            batch = range(first, min(first + self.batch_size, len(items)))
            decoded = [(i, self.frames.get(i, items[i], num_frames, stack.frame_side)) for i in batch]
            decoded = [(i, f) for i, f in decoded if f is not None]
            if decoded:
                gens = [self.generation(stack.config.generation, i) for i, _ in decoded]
                outputs, seconds = stack.caption([f for _, f in decoded], generation=gens)
                stages.update(seconds)
                for (i, _), out, gen in zip(decoded, outputs, gens, strict=True):
                    kept.append(i)
                    seeds.append(gen.seed if gen.do_sample else None)
                    captions.append(out.caption)
                    scores.append(out.score)
                    finishes.append(out.finish_reason)
                    # as the server's guard judges it: a row the engine stopped for repeating is a loop
                    kinds.append(getattr(judge(out.caption, out.num_tokens, gen.max_new_tokens, out.finish_reason),
                                         "kind", None))
                    if out.text_emb is not None and out.video_emb is not None:
                        text_emb.append(out.text_emb)
                        video_emb.append(out.video_emb)
            bar.update(len(batch))
            if self.progress_callback is not None:
                total = max(self.expected, len(self.rows) + 1) * len(items)
                self.progress_callback(len(self.rows) * len(items) + batch.stop, total)
        bar.close()
        if not kept:
            raise ValueError(f"no video of {self.dataset.source} could be decoded; see the warnings above")
        grounded = len(text_emb) == len(kept)
        chosen = [items[i] for i in kept]
        info = {"path": str(checkpoint_dir), "fingerprint": stack.fingerprint,
                "projector_type": stack.projector_type, "epoch": stack.config.info.get("epoch"),
                "num_frames": num_frames, "seconds": time.perf_counter() - start, "timings_s": dict(stages)}
        row = checkpoint_row(
            name, captions, scores=scores,
            text_emb=np.stack(text_emb) if grounded else None,               # (n, E)
            video_emb=np.stack(video_emb) if grounded else None,             # (n, E)
            references=[it.reference for it in chosen] if self.dataset.lang else None,
            attributes=[it.attributes for it in chosen] if any(it.attributes for it in chosen) else None,
            lang=self.dataset.lang, ids=[it.id for it in chosen], thresholds=thresholds, info=info,
            degenerate=kinds, finish_reasons=finishes)
        self.rows.append(row)
        self.records += [{"checkpoint": name, "id": it.id, "path": it.rel, "caption": c,
                          "reference": it.reference, "siglip": s, "seed": seed, "finish_reason": f}
                         for it, c, s, seed, f in zip(chosen, captions, scores, seeds, finishes, strict=True)]
        log.info("%s: %d/%d unique (%.2f) | near %d | top mode %.2f | SigLIP %s | R@1 %s | %s %s", name,
                 row["unique"], row["n"], row["diversity"], row["near_unique"], row["top_mode_share"],
                 _fmt(row["siglip_mean"]), _fmt(row["grounding_r1"]), row["status"], ",".join(row["tripped"]))
        del stack
        _evict_private(self.cache, directory.resolve(), set(keep))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.write()
        return row

    def generation(self, base: GenerationConfig, index: int) -> GenerationConfig:
        """Video ``index``'s decoding: ``base`` (a checkpoint's defaults) with the run's decoding fields and
        max_new_tokens; with a given seed, seed + index (mod 2**64)."""
        gen = self.decoding.apply(base)
        if self.decoding.seed is not None:
            gen = replace(gen, seed=(self.decoding.seed + index) % (MAX_SEED + 1))
        if self.max_new_tokens is not None:
            gen = replace(gen, max_new_tokens=self.max_new_tokens)
        return gen

    def _unique_name(self, name: str, directory: Path) -> str:
        """Display name; "parent/name" when another row already uses the name (two runs' epoch-1)."""
        taken = {r["name"] for r in self.rows}
        if name not in taken:
            return name
        qualified = f"{directory.resolve().parent.name}/{name}"
        candidate, k = qualified, 2
        while candidate in taken:
            candidate, k = f"{qualified}#{k}", k + 1
        return candidate

    # -- the report ---------------------------------------------------------------------------------

    def report(self) -> dict:
        import importlib.metadata

        try:
            version = importlib.metadata.version("capguard")
        except importlib.metadata.PackageNotFoundError:
            version = None
        skipped = [{"id": self.dataset.items[i].id, "path": self.dataset.items[i].rel, **err}
                   for i, err in sorted(self.frames.failures.items())]
        warnings = list(self.extra_warnings)
        if skipped:
            warnings.insert(0, {"code": "videos_skipped", "message": f"{len(skipped)} of "
                                f"{len(self.dataset.items)} videos could not be decoded and are left out of "
                                "every figure (see dataset.skipped)."})
        dataset = {"source": self.dataset.source, "kind": self.dataset.kind,
                   "n_videos": len(self.dataset.items),
                   "n_evaluated": len(self.dataset.items) - len(skipped), "references": self.dataset.lang,
                   "has_attributes": any(it.attributes for it in self.dataset.items), "skipped": skipped}
        run = {"created": self.created, "updated": _now(), "seconds": time.perf_counter() - self.started,
               "decode_seconds": self.frames.decode_s, "capguard_version": version,
               "device": self.device_used or self.device,
               "num_frames": self.num_frames, "max_new_tokens": self.max_new_tokens,
               "decoding": self.decoding.given(),   # the fields set for the run; {}: each checkpoint's defaults
               "batch_size": self.batch_size, "thresholds": asdict(self.thresholds or GuardThresholds()),
               "thresholds_source": "explicit" if self.thresholds else "defaults + checkpoint guard sections",
               "metrics": metric_notes(self.dataset.lang)}
        return build_report(self.rows, dataset, run, warnings)

    def write(self) -> dict:
        """Rewrite report.json, captions.jsonl and report.html (each atomically); returns the report."""
        from capguard.models.report import render_html

        report = self.report()
        _atomic_write(self.out_dir / "report.json", json.dumps(report, ensure_ascii=False, indent=1) + "\n")
        _atomic_write(self.out_dir / "captions.jsonl",
                      "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.records))
        _atomic_write(self.out_dir / "report.html", render_html(report))
        return report

    def resume(self) -> int:
        """Keep the rows of an earlier report in out_dir on the same data set (a restarted watch).

        Returns how many rows were kept; a report on another data set is not touched and nothing is kept.
        """
        path = self.out_dir / "report.json"
        if not path.is_file():
            return 0
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            log.warning("%s is not valid JSON; starting a new report", path)
            return 0
        same = old.get("dataset", {}).get("source") == self.dataset.source and \
            old.get("dataset", {}).get("n_videos") == len(self.dataset.items)
        if not same:
            log.warning("%s is a report on another data set; it will be replaced", path)
            return 0
        self.rows = list(old.get("checkpoints", []))
        self.created = old.get("run", {}).get("created", self.created)
        names = {r["name"] for r in self.rows}
        captions = self.out_dir / "captions.jsonl"
        if captions.is_file():
            self.records = [r for r in map(json.loads, captions.read_text(encoding="utf-8").splitlines())
                            if r.get("checkpoint") in names]
        return len(self.rows)


def _fmt(value) -> str:
    return f"{value:.3f}" if is_finite(value) else "-"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _evict_private(cache, directory: Path, keep: set[Path]) -> None:
    """Drop cached components that live inside one checkpoint's directory (a stage-2 epoch's own LLM copy)
    unless a later checkpoint uses them (keep); ../shared components stay for the next epoch."""
    for store in (cache.open_clip, cache.towers, cache.llms):
        for key in [k for k in store if Path(k[0]).is_relative_to(directory) and Path(k[0]) not in keep]:
            del store[key]


def component_paths(checkpoint_dir: str | os.PathLike) -> set[Path]:
    """Resolved vision, LLM and scorer paths a checkpoint's capguard.json names (what a cache keys on)."""
    config = CheckpointConfig.load(checkpoint_dir)
    relative = [config.vision.path, config.llm.path] + ([config.scorer.path] if config.scorer else [])
    return {(Path(checkpoint_dir) / p).resolve() for p in relative}


def evaluate(checkpoint_dirs: Sequence[str | os.PathLike], videos: str | os.PathLike | Dataset,
             out_dir: str | os.PathLike, progress_callback: ProgressCallback | None = None, *,
             references: str = "auto", num_frames: int | None = None, batch_size: int = 16,
             limit: int | None = None, device: str = "auto", thresholds: GuardThresholds | None = None,
             max_new_tokens: int | None = None, cache=None, progress_bar: bool = True,
             frame_loader: FrameLoader | None = None, decoding: DecodingRequest | None = None) -> dict:
    """Caption every video with every checkpoint, write report.json, captions.jsonl and report.html, and
    return the report.

    videos: a manifest, a directory of videos, or a Dataset from load_dataset. progress_callback(done, total)
    is called after every batch (videos captioned so far, over all checkpoints). num_frames, max_new_tokens,
    decoding (capguard.models.decoding.DecodingRequest): default each checkpoint's own. thresholds: as in ``watch``. frame_loader(path, num_frames, max_side) ->
    (T, H, W, 3) uint8 replaces in-process decoding (the server decodes in a worker process). Every
    checkpoint's capguard.json is read before any captioning starts, so a typo fails in a second, not
    after an hour.
    """
    if not checkpoint_dirs:
        raise ValueError("no checkpoints to evaluate; pass at least one checkpoint directory")
    components = [component_paths(directory) for directory in checkpoint_dirs]   # fails fast on a bad one
    dataset = videos if isinstance(videos, Dataset) else load_dataset(videos, references, limit)
    evaluator = Evaluator(dataset, out_dir, num_frames=num_frames, batch_size=batch_size, device=device,
                          thresholds=thresholds, cache=cache, progress_callback=progress_callback,
                          progress_bar=progress_bar, frame_loader=frame_loader,
                          expected_checkpoints=len(checkpoint_dirs), max_new_tokens=max_new_tokens,
                          decoding=decoding)
    for i, directory in enumerate(checkpoint_dirs):
        evaluator.add(directory, keep=set().union(*components[i + 1:]))
    return evaluator.write()
