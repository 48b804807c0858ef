"""The evaluation report for captions written elsewhere: one caption file per checkpoint or epoch.

    report = evaluate_captions(["run/epoch-1.jsonl", "run/epoch-2.jsonl"], "out/eval")
    report["verdicts"]   # {"epoch-1": "ok", "epoch-2": "collapsed"}

Same rows, verdicts, warnings and pages as ``capguard.models.evaluate`` (``checkpoint_row`` and
``build_report`` are shared, so a caption file and a checkpoint are judged by one implementation); only
where the captions come from differs. SigLIP and grounding, per file:
- rows with a ``siglip`` score: the file's scores are the SigLIP column (the user's own scorer);
- rows with video files and a scorer (``scorer``: the shipped demo scorer by default, or any open_clip
  directory): grounding R@1 always, and SigLIP when the file gave none;
- neither: the text figures only (unique, near-unique, modes, repeat probability, self-BLEU), and the
  guard rules that read them.

Video embeddings are computed once per video file and reused by every caption file (epochs of one run
caption the same videos).
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from capguard.models.captions_file import CaptionsFile, atomic_write_text, read_captions_file
from capguard.models.rules import GuardThresholds

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]   # models/evaluate/captions.py -> the repository
SHIPPED_SCORER = REPO_ROOT / "checkpoints" / "shared" / "siglip"   # the demo scorer (checkpoints/README.md)
FrameLoader = Callable[[Path, int, int], np.ndarray]   # (path, num_frames, max_side) -> (T, H, W, 3) uint8
ProgressCallback = Callable[[int, int], None]           # (videos embedded so far, videos to embed)


class VideoScorer:
    """An open_clip SigLIP/CLIP model from a local directory: video and caption embeddings, pair scores.

    The same ``Scorer`` a checkpoint's ``scorer`` section loads (capguard.models.scorer), without a
    captioner. Video embedding = normalized mean of the normalized frame embeddings, (E,).
    """

    def __init__(self, directory: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                 device: str = "auto", num_frames: int = 8, frame_loader: FrameLoader | None = None):
        import torch

        from capguard.models.encoder import FramePreprocessor, load_open_clip
        from capguard.models.scorer import Scorer, load_tokenizer
        from capguard.models.stack import pick_device

        self.directory = Path(directory)
        model, preprocess_cfg = load_open_clip(self.directory)
        self.device = pick_device(device)
        model = model.to(self.device).float()
        tok_dir = Path(tokenizer) if tokenizer else (self.directory if (self.directory / "tokenizer.json")
                                                     .is_file() else None)
        self.scorer = Scorer(model, load_tokenizer(self.directory, tok_dir, model.context_length))
        self.preprocess = FramePreprocessor(preprocess_cfg).to(self.device)
        self.num_frames = num_frames
        self.frame_loader = frame_loader or _sample
        self.side = 2 * max(self.preprocess.size)      # decode at twice the input, as the stacks do
        self._videos: dict[Path, np.ndarray | dict] = {}  # path -> (E,) embedding, or {"code", "message"}
        self._torch = torch

    def video_embedding(self, path: Path) -> np.ndarray | None:
        """(E,) float32 unit embedding of one video; None (and a logged warning) when it cannot be decoded."""
        from capguard.models.video import VideoError

        key = Path(path).resolve()
        if key not in self._videos:
            try:
                frames = self.frame_loader(key, self.num_frames, self.side)          # (T, H, W, 3) uint8
            except (VideoError, OSError) as exc:
                self._videos[key] = {"code": getattr(exc, "code", "io_error"), "message": str(exc)}
                log.warning("cannot score against %s: %s", path, exc)
            else:
                pixels = self.preprocess(self._torch.from_numpy(np.ascontiguousarray(frames)).to(self.device))
                image = self.scorer.image_features(pixels)                              # (T, E)
                self._videos[key] = self.scorer.video_embeddings(image, [len(frames)])[0].cpu().numpy()
        value = self._videos[key]
        return value if isinstance(value, np.ndarray) else None

    def failure(self, path: Path) -> dict | None:
        value = self._videos.get(Path(path).resolve())
        return value if isinstance(value, dict) else None

    def text_embeddings(self, captions: list[str], batch: int = 256) -> np.ndarray:
        """(n, E) float32 unit caption embeddings."""
        out = [self.scorer.text_embeddings(captions[i:i + batch]).cpu().numpy()
               for i in range(0, len(captions), batch)]
        return np.concatenate(out)

    def scores(self, text_emb: np.ndarray, video_emb: np.ndarray) -> list[float]:
        """Caption i against video i: SigLIP probability (CLIPScore for CLIP models), (n,)."""
        t = self._torch.from_numpy(text_emb).to(self.device)
        v = self._torch.from_numpy(video_emb).to(self.device)
        return self.scorer.scores(t, v).cpu().tolist()


def _sample(path: Path, num_frames: int, max_side: int) -> np.ndarray:
    from capguard.models.video import VideoLimits, sample_frames

    return sample_frames(path, num_frames, VideoLimits(), max_side=max_side).frames


def resolve_scorer(scorer: str | os.PathLike | None, files: Sequence[CaptionsFile]) -> Path | None:
    """Which scorer directory to load: None when no file names video files or scorer is "none"; "auto"
    (or None) -> the shipped demo scorer when it is there; anything else must be an open_clip directory."""
    if scorer == "none" or not any(r.video_path is not None for f in files for r in f.rows):
        return None
    if scorer in (None, "auto"):
        if SHIPPED_SCORER.is_dir():
            return SHIPPED_SCORER
        log.warning("no scorer: the shipped demo scorer is not installed (%s); pass --scorer DIR", SHIPPED_SCORER)
        return None
    path = Path(scorer)
    if not path.is_dir():
        raise FileNotFoundError(f"--scorer {scorer}: no such directory; pass an open_clip model directory "
                                "(open_clip_config.json + weights), e.g. checkpoints/shared/siglip")
    return path


def caption_file_row(captions: CaptionsFile, scorer: VideoScorer | None, thresholds: GuardThresholds,
                     lang: str | None = None) -> tuple[dict, list[dict], list[dict]]:
    """One file's report row, its captions.jsonl records, and the videos its scorer could not decode."""
    from capguard.models.evaluate import checkpoint_row

    rows = captions.rows
    texts = [r.caption for r in rows]
    given = [r.siglip for r in rows]
    scores: list[float | None] = given
    source = "file" if any(s is not None for s in given) else None
    text_emb = video_emb = None
    skipped = []
    if scorer is not None and all(r.video_path is not None for r in rows):
        embedded = [scorer.video_embedding(r.video_path) for r in rows]
        skipped = [{"video": r.video, "path": str(r.video_path), **scorer.failure(r.video_path)}
                   for r, e in zip(rows, embedded, strict=True) if e is None]
        if not skipped:
            video_emb = np.stack(embedded)                                 # (n, E)
            text_emb = scorer.text_embeddings(texts)                       # (n, E)
            if source is None:
                scores, source = scorer.scores(text_emb, video_emb), f"scorer {scorer.directory}"
    info = {"path": None, "captions_file": captions.source, "siglip_source": source,
            "scorer": str(scorer.directory) if scorer is not None and text_emb is not None else None}
    references = [r.reference for r in rows]
    row = checkpoint_row(captions.name, texts, scores=scores, text_emb=text_emb, video_emb=video_emb,
                         references=references if any(references) else None, lang=lang,
                         ids=[r.video for r in rows], thresholds=thresholds, info=info)
    records = [{"checkpoint": captions.name, "id": r.video, "path": str(r.video_path) if r.video_path else None,
                "caption": r.caption, "reference": r.reference, "siglip": s}
               for r, s in zip(rows, scores, strict=True)]
    return row, records, skipped


def evaluate_captions(files: Sequence[CaptionsFile | str | os.PathLike], out_dir: str | os.PathLike, *,
                      videos_root: str | os.PathLike | None = None, scorer: str | os.PathLike | None = "auto",
                      scorer_tokenizer: str | os.PathLike | None = None, device: str = "auto",
                      num_frames: int = 8, thresholds: GuardThresholds | None = None,
                      frame_loader: FrameLoader | None = None,
                      progress_callback: ProgressCallback | None = None) -> dict:
    """Judge each caption file as one checkpoint (in the order given); write report.json, captions.jsonl and
    report.html into out_dir (each atomically, after every file) and return the report.

    files: paths (read with ``read_captions_file``; video paths relative to videos_root, else to the file)
    or CaptionsFile objects already read (uploads). Every file is read and checked before any scoring, so
    a bad line fails in a second. scorer: "auto" (the shipped demo scorer), an open_clip directory, or
    "none". thresholds: the guard's (GuardThresholds() by default).
    """
    from capguard.models.evaluate import build_report

    if not files:
        raise ValueError("no caption files to evaluate; pass at least one JSONL file")
    loaded = [f if isinstance(f, CaptionsFile) else read_captions_file(f, videos_root=videos_root)
              for f in files]
    names = [f.name for f in loaded]
    if len(set(names)) != len(names):
        loaded = [_renamed(f, i, names) for i, f in enumerate(loaded)]
    thresholds = thresholds or GuardThresholds()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started, created = time.perf_counter(), _now()
    scorer_dir = resolve_scorer(scorer, loaded)
    video_scorer = None
    if scorer_dir is not None:
        video_scorer = VideoScorer(scorer_dir, scorer_tokenizer, device, num_frames, frame_loader)
    lang = _lang(loaded)
    rows, records, skipped = [], [], []
    total = sum(len(f.rows) for f in loaded)
    done = 0
    report: dict = {}
    for f in loaded:
        row, recs, failed = caption_file_row(f, video_scorer, thresholds, lang)
        rows.append(row)
        records += recs
        skipped += [{"file": f.name, **s} for s in failed]
        done += len(f.rows)
        if progress_callback is not None:
            progress_callback(done, total)
        log.info("%s: %d/%d unique (%.2f) | near %d | top mode %.2f | SigLIP %s | R@1 %s | %s %s", f.name,
                 row["unique"], row["n"], row["diversity"], row["near_unique"], row["top_mode_share"],
                 _fmt(row["siglip_mean"]), _fmt(row["grounding_r1"]), row["status"], ",".join(row["tripped"]))
        report = _write(out, build_report(rows, _dataset(loaded, skipped, lang), _run(
            created, started, scorer_dir, num_frames, thresholds, lang), _warnings(loaded, skipped)), records)
    return report


def _renamed(f: CaptionsFile, index: int, names: list[str]) -> CaptionsFile:
    """Two files with one stem (run-a/epoch-1.jsonl, run-b/epoch-1.jsonl) -> "run-a/epoch-1", else "#k"."""
    if names.count(f.name) == 1:
        return f
    parent = Path(f.source).parent.name
    name = f"{parent}/{f.name}" if parent else f"{f.name}#{index + 1}"
    return CaptionsFile(name, f.source, f.rows)


def _lang(files: Sequence[CaptionsFile]) -> str | None:
    refs = [r.reference for f in files for r in f.rows if r.reference]
    if not refs:
        return None
    return "ko" if any("\uac00" <= ch <= "\ud7a3" for ref in refs for ch in ref) else "en"


def _dataset(files: Sequence[CaptionsFile], skipped: list[dict], lang: str | None) -> dict:
    videos = {r.video for f in files for r in f.rows}
    return {"source": ", ".join(f.source for f in files), "kind": "captions", "files": [f.source for f in files],
            "n_videos": len(videos), "n_evaluated": len(videos), "references": lang, "has_attributes": False,
            "skipped": skipped}


def _run(created: str, started: float, scorer: Path | None, num_frames: int, thresholds: GuardThresholds,
         lang: str | None) -> dict:
    from capguard.models.evaluate import metric_notes

    try:
        version = importlib.metadata.version("capguard")
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {"created": created, "updated": _now(), "seconds": time.perf_counter() - started,
            "capguard_version": version, "scorer": str(scorer) if scorer else None,
            "num_frames": num_frames if scorer else None, "thresholds": asdict(thresholds),
            "thresholds_source": "explicit", "metrics": metric_notes(lang)}


def _warnings(files: Sequence[CaptionsFile], skipped: list[dict]) -> list[dict]:
    warnings = []
    if skipped:
        names = sorted({s["file"] for s in skipped})
        warnings.append({"code": "videos_skipped", "message": (
            f"{len(skipped)} video files could not be decoded ({', '.join(names)}): those files get no "
            "scorer figures (see dataset.skipped).")})
    partial = [f.name for f in files if not f.has_videos and any(r.video_path is not None for r in f.rows)]
    if partial:
        warnings.append({"code": "partial_video_paths", "message": (
            f"Some rows of {', '.join(partial)} name no video_path; a file is scored (SigLIP, grounding R@1) "
            "only when every row names its video.")})
    sets = [frozenset(r.video for r in f.rows) for f in files]
    if len(set(sets)) > 1:
        warnings.append({"code": "different_videos", "message": (
            "The caption files do not caption the same videos; their figures compare different sets "
            f"({', '.join(f'{f.name}: {len(s)}' for f, s in zip(files, sets, strict=True))}).")})
    return warnings


def _write(out: Path, report: dict, records: list[dict]) -> dict:
    from capguard.models.report import render_html

    atomic_write_text(out / "report.json", json.dumps(report, ensure_ascii=False, indent=1) + "\n")
    atomic_write_text(out / "captions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    atomic_write_text(out / "report.html", render_html(report))
    return report


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


__all__ = ["SHIPPED_SCORER", "VideoScorer", "caption_file_row", "evaluate_captions", "resolve_scorer"]
