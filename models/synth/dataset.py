"""Video files and the data set: reproducible H.264 mp4s (``write_video``) and ``make_dataset``, which
renders balanced train/val splits in worker processes and writes their JSONL manifests."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import av
import numpy as np
from tqdm import tqdm

from capguard.models.synth.attributes import (
    ALLOWED,
    ATTRIBUTE_NAMES,
    CLASHES,
    DOORS,
    BuildingAttrs,
    caption_en,
    caption_ko,
)
from capguard.models.synth.render import render_frames

log = logging.getLogger(__name__)


def write_video(frames: np.ndarray, path: str | Path, fps: int = 8, crf: int = 18) -> Path:
    """Write (T, H, W, 3) uint8 frames as an H.264 mp4 (yuv420p) whose bytes are reproducible run to run.

    yuv420p needs even sides: an odd height or width is padded by repeating the last row or column.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"write_video wants (T, H, W, 3) uint8 frames with T >= 1, got {frames.shape} {frames.dtype}")
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format="mp4") as container:
        # Reproducible bytes need one thread AND no macroblock tree: with mbtree on, this x264 build gave
        # up to 3 different files for the same frames in 15 single-threaded runs; with it off, 12 clips
        # x 15 runs gave one file per clip. Quality is not the point of these clips.
        options = {"crf": str(crf), "preset": "medium", "x264-params": "mbtree=0"}
        stream = container.add_stream("libx264", rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.thread_count = 1
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def _balanced_attributes(rng: np.random.Generator, n: int) -> list[BuildingAttrs]:
    """n combinations in which every attribute's values appear equally often (within one).

    Each attribute is drawn independently, so combinations are random, but no value goes missing from
    a split of at least 7 clips: validation combinations are new pairings of values seen in training.
    """
    columns: dict[str, list[Any]] = {}
    for name in ATTRIBUTE_NAMES:
        values = ALLOWED[name]
        k = len(values)
        idx = np.concatenate([np.tile(np.arange(k), n // k), rng.choice(k, n % k, replace=False)])
        columns[name] = [values[i] for i in rng.permutation(idx)]
    rows = [dict(zip(ATTRIBUTE_NAMES, vals, strict=True)) for vals in zip(*columns.values(), strict=True)]
    for row in rows:
        while (row["colour"], row["door"]) in CLASHES:
            row["door"] = ALLOWED["door"][rng.integers(len(DOORS))]
    return [BuildingAttrs(**row) for row in rows]


def _video_seed(seed: int, split: str, index: int) -> list[int]:
    """The rendering seed of one clip: independent of worker count and of the other splits' sizes."""
    return [seed, zlib.crc32(split.encode()), index]


def _render_job(job: tuple[dict[str, Any], list[int], str, int, int, int]) -> str:
    attrs, seed, path, num_frames, size, fps = job
    frames = render_frames(BuildingAttrs(**attrs), np.random.default_rng(seed), num_frames, size)
    write_video(frames, path, fps)
    return path


def make_dataset(
    out_dir: str | Path,
    n_train: int = 865,
    n_val: int = 97,
    seed: int = 0,
    size: int = 128,
    seconds: float = 2.0,
    fps: int = 8,
    splits: Mapping[str, int] | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Render the demo data set; returns {split: manifest path}.

    Writes out_dir/<split>/<split>-00000.mp4 ... and out_dir/<split>.jsonl, one line per clip:
    {"id", "path" (relative to out_dir), "caption_ko", "caption_en", "attributes"}. The default sizes
    are the field report's 865 training and 97 validation videos; `splits` ({"train": 10, "test": 5})
    replaces n_train/n_val. Same seed, same manifests and same video bytes, whatever `workers` is
    (default: one process per CPU core, at most 2; 1 renders in this process).
    """
    splits = dict(splits) if splits is not None else {"train": n_train, "val": n_val}
    if any(n < 0 for n in splits.values()):
        raise ValueError(f"split sizes must be >= 0, got {splits}")
    num_frames = max(1, round(seconds * fps))
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    jobs, manifests, records = [], {}, {}
    for split, n in splits.items():
        (out_dir / split).mkdir(parents=True, exist_ok=True)
        records[split] = []
        for i, attrs in enumerate(_balanced_attributes(rng, n)):
            rel = f"{split}/{split}-{i:05d}.mp4"
            records[split].append({"id": f"{split}-{i:05d}", "path": rel, "caption_ko": caption_ko(attrs),
                                   "caption_en": caption_en(attrs), "attributes": attrs.to_dict()})
            jobs.append((attrs.to_dict(), _video_seed(seed, split, i), str(out_dir / rel), num_frames, size, fps))
    _log_split_overlap(records)

    workers = workers or min(2, os.cpu_count() or 1)
    bar = tqdm(total=len(jobs), desc="rendering videos", unit="video", disable=not progress)
    if workers == 1:
        for job in jobs:
            _render_job(job)
            bar.update()
    else:
        # fork where there is one: spawn re-runs the caller's unguarded script in every worker (a pool
        # that never starts). The workers only use numpy, PIL and PyAV, none of torch's threads.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with multiprocessing.get_context(method).Pool(workers) as pool:
            for _ in pool.imap_unordered(_render_job, jobs, chunksize=8):
                bar.update()
    bar.close()

    for split, rows in records.items():
        manifests[split] = out_dir / f"{split}.jsonl"
        manifests[split].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    log.info("wrote %d videos (%d frames of %dx%d at %d fps) to %s", len(jobs), num_frames, size, size, fps, out_dir)
    return manifests


def _log_split_overlap(records: Mapping[str, list[dict[str, Any]]]) -> None:
    """Log how the other splits relate to train: unseen values (bad) and repeated combinations."""
    if "train" not in records:
        return
    seen = {(k, v) for r in records["train"] for k, v in r["attributes"].items()}
    combos = {tuple(sorted(r["attributes"].items())) for r in records["train"]}
    for split, rows in records.items():
        if split == "train" or not rows:
            continue
        unseen = sorted({(k, v) for r in rows for k, v in r["attributes"].items()} - seen, key=str)
        repeated = sum(tuple(sorted(r["attributes"].items())) in combos for r in rows)
        if unseen:
            log.warning("split %s has attribute values never seen in train: %s; make train larger", split, unseen)
        log.info("split %s: %d/%d attribute combinations also occur in train (%.0f%%)",
                 split, repeated, len(rows), 100 * repeated / len(rows))
