"""Offline evaluation: caption one data set with several checkpoints and say which of them collapsed.

    report = evaluate(["runs/mlp/epoch-1", "runs/mlp/epoch-2"], "data/synth/val.jsonl", "out/eval")
    report["checkpoints"][0]["diversity"], report["verdicts"], report["warnings"]
    watch("runs/mlp", "data/synth/val.jsonl", "out/eval", interval=30)  # one report, a row per new epoch

This reproduces the field report's tables (../shared/seed/): per checkpoint the unique captions, the
diversity, SigLIP and a representative caption, plus what that report lacked: near-duplicate modes,
grounding R@1, a verdict from the live guard's own rules, and the SigLIP-vs-diversity relation whose
sign was the report's trap (E5-v3: SigLIP rose while diversity fell).

Every diversity figure comes from capguard.models.diversity, the functions the server's guard uses. This module
adds only what needs references or several checkpoints: BLEU and chrF (sacrebleu), CIDEr-D (hand-written,
see ``cider_d``), attribute accuracy (capguard.models.synth) and a Spearman rank correlation (numpy, ``spearman``).

Outputs in out_dir, each rewritten atomically after every checkpoint so a reader (the server, a browser
refresh) never sees half a file: report.json (the dict ``evaluate`` returns), captions.jsonl (one line
per checkpoint x video) and report.html (capguard.models.report.render_html).

Cost: each video is decoded once per (frame count, frame size), normally once, and the frames are reused
by every checkpoint; checkpoints load one at a time through one ComponentCache, so epochs sharing an
encoder or LLM load it once, and components private to a checkpoint are dropped after it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import sacrebleu
from sacrebleu.metrics import BLEU, CHRF
from tqdm import tqdm

from capguard.models.config import MANIFEST_NAME, CheckpointConfig
from capguard.models.diversity import GuardThresholds, diversity_report, normalize_caption, tripped_rules

log = logging.getLogger(__name__)

REPORT_VERSION = 1
MIN_CORRELATION_POINTS = 3   # checkpoints with SigLIP and diversity before the Spearman figure is reported
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts")
ProgressCallback = Callable[[int, int], None]   # (videos captioned so far, videos to caption in all)
FrameLoader = Callable[[Path, int, int], np.ndarray]   # (path, num_frames, max_side) -> (T, H, W, 3) uint8

# ---------------------------------------------------------------------------------------------------
# Data sets


@dataclass
class VideoItem:
    id: str                          # manifest "id" (else the relative path): joins captions to videos
    path: Path                       # absolute file path: what the decoder opens
    rel: str                         # path relative to the data set root: what reports show (portable)
    reference: str | None = None     # reference caption in the report's language; None: not scored
    attributes: dict | None = None   # synth.BuildingAttrs fields (make-videos manifests): attribute accuracy


@dataclass
class Dataset:
    source: str                # what the caller passed (a manifest or a directory), recorded in the report
    kind: str                  # "manifest" | "dir"
    root: Path                 # the directory item paths are relative to
    items: list[VideoItem]
    lang: str | None = None    # language of the references ("ko" | "en"); None: no references


def natural_key(text: str) -> list:
    """Sort key that orders digit runs as numbers: "epoch-2" < "epoch-10" (plain sorting puts 10 first).

    Example: sorted(["epoch-10", "epoch-2", "epoch-1"], key=natural_key)
    -> ["epoch-1", "epoch-2", "epoch-10"].
    """
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text)]


def _has_hangul(text: str) -> bool:
    return any("\uac00" <= ch <= "\ud7a3" for ch in text)


def load_dataset(source: str | os.PathLike, references: str = "auto", limit: int | None = None) -> Dataset:
    """A JSONL manifest (``capguard make-videos`` writes one) or a directory of videos -> a Dataset.

    Manifest lines: {"id", "path" (relative to the manifest's directory, or absolute), and optionally
    "caption_ko", "caption_en" (or a plain "caption"/"reference") and "attributes"}. A directory is
    searched recursively for VIDEO_EXTENSIONS files (natural order) and has no references.
    references: "auto" (Korean if the manifest has caption_ko, else English, else any plain caption),
    "ko", "en", or "none". limit: keep the first N videos.
    """
    if references not in ("auto", "ko", "en", "none"):
        raise ValueError(f"references={references!r}: use auto, ko, en or none")
    path = Path(source)
    if path.is_dir():
        files = sorted((p for p in path.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file()),
                       key=lambda p: natural_key(p.relative_to(path).as_posix()))
        items = [VideoItem(p.relative_to(path).as_posix(), p.resolve(), p.relative_to(path).as_posix())
                 for p in files]
        dataset = Dataset(str(source), "dir", path.resolve(), items)
    elif path.is_file():
        dataset = _load_manifest(path, references)
    else:
        raise FileNotFoundError(f"videos {source}: no such file or directory; pass a directory of videos "
                                "or a JSONL manifest (write one with `capguard make-videos`)")
    if limit is not None:
        dataset.items = dataset.items[:limit]
    if not dataset.items:
        raise ValueError(f"no videos in {source} (looked for {', '.join(VIDEO_EXTENSIONS)} files or manifest "
                         "lines); check the path")
    if dataset.lang is None:
        for item in dataset.items:
            item.reference = None
    return dataset


def _load_manifest(path: Path, references: str) -> Dataset:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON ({exc}); a manifest has one JSON object per line") \
                from None
        if not isinstance(row, dict) or not isinstance(row.get("path"), str):
            raise ValueError(f"{path}:{number}: each manifest line needs a \"path\" string")
        rows.append(row)
    fields_found = {k for row in rows for k in row}
    if references == "auto":
        candidates = ("caption_ko", "caption_en", "reference", "caption")
        field_name = next((f for f in candidates if f in fields_found), None)
    elif references == "none":
        field_name = None
    else:
        field_name = f"caption_{references}"
        if field_name not in fields_found:
            raise ValueError(f"{path} has no {field_name} field (it has {sorted(fields_found)}); "
                             "pick another --references language or none")
    root = path.parent.resolve()
    items = []
    for row in rows:
        file = Path(row["path"])
        file = file if file.is_absolute() else root / file
        reference = row.get(field_name) if field_name else None
        attributes = row.get("attributes") if isinstance(row.get("attributes"), dict) else None
        rel = os.path.relpath(file, root) if not Path(row["path"]).is_absolute() else row["path"]
        items.append(VideoItem(str(row.get("id") or Path(row["path"]).with_suffix("").as_posix()),
                               file, Path(rel).as_posix(), reference if isinstance(reference, str) else None,
                               attributes))
    lang = None
    if field_name in ("caption_ko", "caption_en"):
        lang = field_name[-2:]
    elif field_name is not None:   # a plain caption: Hangul in the references means Korean
        lang = "ko" if any(_has_hangul(i.reference or "") for i in items) else "en"
    return Dataset(str(path), "manifest", root, items, lang)


# ---------------------------------------------------------------------------------------------------
# Metrics that need references or several checkpoints


def rank_average(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n in ascending order; tied values share the mean of the ranks they span.

    Example: [10, 20, 20, 30] -> [1.0, 2.5, 2.5, 4.0]; [3, 1, 2] -> [3.0, 1.0, 2.0].
    """
    x = np.asarray(values, dtype=np.float64)                 # (n,)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)                                  # (u,) the highest rank in each tie group
    return (last - (counts - 1) / 2.0)[inverse]


def spearman(x: Sequence[float | None], y: Sequence[float | None]) -> float:
    """Spearman's rank correlation with averaged ties (Pearson correlation of the ranks).

    Pairs where either value is None or nan are dropped; fewer than 2 pairs, or a constant side -> nan.
    Hand-written because scipy is not a dependency; tests check it against hand-computed values.

    Example: x=[1, 2, 3, 4, 5], y=[5, 6, 7, 8, 7] -> ranks y [1, 2, 3.5, 5, 3.5] -> 8 / sqrt(10 * 9.5)
    = 0.8208; x=[1, 2, 3], y=[3, 2, 1] -> -1.0.
    """
    if len(x) != len(y):
        raise ValueError(f"spearman needs paired values, got {len(x)} and {len(y)}")
    pairs = [(a, b) for a, b in zip(x, y, strict=True) if _finite(a) and _finite(b)]
    if len(pairs) < 2:
        return math.nan
    rx = rank_average([a for a, _ in pairs])
    ry = rank_average([b for _, b in pairs])
    dx, dy = rx - rx.mean(), ry - ry.mean()
    denominator = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(dx @ dy) / denominator if denominator > 0 else math.nan


def _finite(value) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


def _ngram_counts(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


def cider_d(candidates: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]],
            n: int = 4, sigma: float = 6.0) -> tuple[float, list[float]]:
    """CIDEr-D (Vedantam et al. 2015, as in the COCO caption toolkit) of tokenized captions -> (mean, items).

    Each n-gram (n = 1..4) is weighted tf * idf, idf = log(N / max(1, df)), with N items and df the number
    of items whose references contain it (so idf comes from this data set's references). Per order, the
    cosine of candidate and reference vectors with the candidate's weights clipped to the reference's
    (``min(c, r) * r``), times the length penalty exp(-(len_c - len_r)^2 / (2 sigma^2)); averaged over
    orders and references, times 10. Hand-written: pycocoevalcap implements it but is a 104 MB wheel of
    Java jars, unmaintained since 2020; its cider_scorer gives the same numbers (tests check a value it
    produced), except that it measures lengths in bigrams, so an empty caption scores alike there only
    when the reference is one token long.

    Example: candidates [["a", "b"], ["a", "c"]], references [[["a", "b"]], [["c", "d"]]], n=1 ->
    item 1: vectors equal, cosine 1 -> 10.0; item 2: only "c" shared, (log 2)^2 / (sqrt 2 log 2)^2 = 0.5
    -> 5.0; mean 7.5.
    """
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    if not candidates:
        return math.nan, []
    ref_counts = [[_ngram_counts(r, n) for r in refs] for refs in references]
    document_frequency: Counter = Counter()
    for refs in ref_counts:
        document_frequency.update(set().union(*(c.keys() for c in refs)))
    log_items = math.log(len(candidates))

    def weights(counts: Counter) -> tuple[list[dict], np.ndarray]:
        vec: list[dict] = [{} for _ in range(n)]
        for gram, tf in counts.items():
            vec[len(gram) - 1][gram] = tf * (log_items - math.log(max(1.0, document_frequency[gram])))
        return vec, np.array([math.sqrt(sum(w * w for w in v.values())) for v in vec])   # (n,) norms

    scores = []
    for tokens, refs, counts_per_ref in zip(candidates, references, ref_counts, strict=True):
        if not refs:
            raise ValueError("every candidate needs at least one reference")
        vec, norm = weights(_ngram_counts(tokens, n))
        total = np.zeros(n)                                            # (n,) summed over references
        for ref_tokens, ref_counts_one in zip(refs, counts_per_ref, strict=True):
            ref_vec, ref_norm = weights(ref_counts_one)
            penalty = math.exp(-((len(tokens) - len(ref_tokens)) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                dot = sum(min(w, ref_vec[k].get(g, 0.0)) * ref_vec[k].get(g, 0.0) for g, w in vec[k].items())
                if norm[k] > 0 and ref_norm[k] > 0:
                    total[k] += dot / (norm[k] * ref_norm[k]) * penalty
        scores.append(10.0 * float(total.mean()) / len(refs))
    return float(np.mean(scores)), scores


def caption_tokens(text: str, lang: str) -> list[str]:
    """Units for CIDEr-D: Hangul syllables for Korean (spacing-free, like every count in capguard.models.diversity:
    Korean word spacing varies and particles attach to words), words of the normalized caption otherwise.

    Example: ("낮의 풍경.", "ko") -> ["낮", "의", "풍", "경"];
    ("A grey building.", "en") -> ["a", "grey", "building"].
    """
    if lang == "ko":
        return list(normalize_caption(text, keep_spaces=False))
    return normalize_caption(text).split()


def bleu_tokenizer(lang: str) -> str:
    """sacrebleu tokenizer per language: "char" for Korean (syllables; no MeCab needed, and a one-syllable
    particle change is not a whole-word miss), "13a" (sacrebleu's default, WMT's) for English."""
    return "char" if lang == "ko" else "13a"


def reference_metrics(captions: Sequence[str], references: Sequence[str | None], lang: str) -> dict:
    """BLEU and chrF (sacrebleu, 0-100) and CIDEr-D (0-10) of captions against one reference each.

    Pairs without a reference are left out; none at all -> all None.
    Example: (["낮의 풍경"], ["낮의 풍경"], "ko") -> {"bleu": 100.0, "chrf": 100.0, "cider_d": 0.0, "n": 1}
    (CIDEr-D is 0 with a single item: every n-gram is in every reference, so idf = 0).
    """
    pairs = [(c, r) for c, r in zip(captions, references, strict=True) if r is not None]
    if not pairs:
        return {"bleu": None, "chrf": None, "cider_d": None, "n": 0}
    hyps, refs = [c for c, _ in pairs], [r for _, r in pairs]
    bleu = BLEU(tokenize=bleu_tokenizer(lang)).corpus_score(hyps, [refs]).score
    chrf = CHRF().corpus_score(hyps, [refs]).score
    cider, _ = cider_d([caption_tokens(h, lang) for h in hyps], [[caption_tokens(r, lang)] for r in refs])
    return {"bleu": bleu, "chrf": chrf, "cider_d": cider, "n": len(pairs)}


def metric_notes(lang: str | None) -> dict:
    """What each reference metric measured, recorded in the report so a number explains itself."""
    if lang is None:
        return {}
    return {
        "bleu": f"sacrebleu {sacrebleu.__version__} corpus BLEU, tokenize={bleu_tokenizer(lang)}, "
                "smooth=exp, one reference per video (0-100)",
        "chrf": f"sacrebleu {sacrebleu.__version__} corpus chrF (char 6-grams, beta 2, no word n-grams; "
                "spacing ignored) (0-100)",
        "cider_d": "CIDEr-D, n=1..4, sigma=6, idf from this data set's references, units: "
                   + ("Hangul syllables" if lang == "ko" else "words") + " (0-10)",
        "attribute_accuracy": "capguard.models.synth.attribute_accuracy: share of the 7 attributes a caption states "
                              "correctly (an attribute left out counts as wrong), mean over videos",
    }


def attribute_scores(captions: Sequence[str], attributes: Sequence[dict | None], lang: str) -> dict | None:
    """Mean attribute accuracy over the videos that have attributes, and per attribute; None if none have.

    Example: one caption stating 6 of the 7 attributes right -> {"mean": 0.857, "by_attribute": {...},
    "n": 1}.
    """
    from capguard.models import synth

    hits: dict[str, list[bool]] = {}
    per_video = []
    for caption, attrs in zip(captions, attributes, strict=True):
        if attrs is None:
            continue
        correct = synth.attribute_accuracy(caption, synth.BuildingAttrs(**attrs), lang)
        per_video.append(float(np.mean(list(correct.values()))))
        for name, ok in correct.items():
            hits.setdefault(name, []).append(ok)
    if not per_video:
        return None
    by_attribute = {k: float(np.mean(v)) for k, v in hits.items()}
    return {"mean": float(np.mean(per_video)), "by_attribute": by_attribute, "n": len(per_video)}


# ---------------------------------------------------------------------------------------------------
# Rows and the report: pure functions of captions and scores (the tests drive them without a model)

ROW_KEYS = (
    "name", "path", "fingerprint", "projector_type", "epoch", "n", "unique", "diversity", "near_unique",
    "near_unique_ratio", "top_mode_share", "top_mode", "repeat_probability", "distinct_1", "distinct_2",
    "self_bleu", "siglip_mean", "siglip_median", "grounding_r1", "grounding_margin", "bleu", "chrf",
    "cider_d", "attribute_accuracy", "attribute_accuracy_by_name", "status", "tripped", "thresholds", "modes",
    "num_frames", "seconds", "timings_s",
)


def checkpoint_row(name: str, captions: Sequence[str], *, scores: Sequence[float | None] | None = None,
                   text_emb: np.ndarray | None = None, video_emb: np.ndarray | None = None,
                   references: Sequence[str | None] | None = None,
                   attributes: Sequence[dict | None] | None = None, lang: str | None = None,
                   ids: Sequence[str] | None = None, thresholds: GuardThresholds | None = None,
                   info: dict | None = None, top_k: int = 5) -> dict:
    """One checkpoint's report row (keys: ROW_KEYS) from its captions of the data set, in data set order.

    scores: SigLIP probability per caption (None: no scorer). text_emb/video_emb: (n, E) scorer embeddings
    for grounding. references/attributes: per video, None where absent. ids: video ids, to name a mode's
    videos. info: path, fingerprint, ... copied into the row. Verdict: "collapsed" if any guard rule of
    thresholds (default GuardThresholds()) trips; the row records the thresholds it was judged by.

    Example: checkpoint_row("e4", ["같은 말"] * 97) -> unique 1, diversity 0.0103, status "collapsed",
    tripped ["unique_ratio", "near_unique_ratio", "top_mode_share"], top_mode "같은 말", top_mode_share 1.0.
    """
    thresholds = thresholds or GuardThresholds()
    report = diversity_report(list(captions), text_emb, video_emb, top_k=top_k,
                              near_dup_threshold=thresholds.near_dup_threshold)
    tripped = tripped_rules(report, thresholds)
    siglip = [s for s in (scores or []) if _finite(s)]
    row = dict.fromkeys(ROW_KEYS)
    row.update(info or {})
    d = report.to_dict()
    row.update({
        "name": name, "n": d["n"], "unique": d["unique"], "diversity": d["unique_ratio"],
        "near_unique": d["near_unique"], "near_unique_ratio": d["near_unique_ratio"],
        "top_mode_share": d["top_mode_share"],
        "top_mode": report.modes[0].representative if report.modes else None,
        "repeat_probability": d["repeat_probability"], "distinct_1": d["distinct_1"],
        "distinct_2": d["distinct_2"], "self_bleu": d["self_bleu"],
        "siglip_mean": float(np.mean(siglip)) if siglip else None,
        "siglip_median": float(np.median(siglip)) if siglip else None,
        "grounding_r1": d["grounding_r1"], "grounding_margin": d["grounding_margin"],
        "status": "collapsed" if tripped else "ok", "tripped": tripped, "thresholds": asdict(thresholds),
        "modes": [{"caption": m.representative, "count": m.count, "share": m.share, "variants": m.variants,
                   "videos": [ids[i] for i in m.members[:5]] if ids is not None else m.members[:5]}
                  for m in report.modes],
    })
    if references is not None and any(r is not None for r in references):
        lang = lang or _guess_lang(r for r in references if r is not None)
        row.update({k: v for k, v in reference_metrics(captions, references, lang).items() if k != "n"})
    if attributes is not None:
        accuracy = attribute_scores(captions, attributes, lang or _guess_lang(captions))
        if accuracy is not None:
            row["attribute_accuracy"] = accuracy["mean"]
            row["attribute_accuracy_by_name"] = accuracy["by_attribute"]
    return _jsonable(row)


def _guess_lang(captions: Iterable[str]) -> str:
    return "ko" if any(_has_hangul(c) for c in captions) else "en"


def _jsonable(value):
    """nan/inf -> None, numpy scalars -> Python, recursively (JSON has no nan)."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def report_warnings(rows: Sequence[dict], correlation: float) -> list[dict]:
    """Plain-language warnings about the rows: collapse, and SigLIP read against diversity.

    Codes: "collapsed" (some checkpoints collapsed), "siglip_diversity_negative" (Spearman < 0 across the
    checkpoints), "siglip_up_diversity_down" (a step between consecutive checkpoints where SigLIP rose and
    diversity fell: the field report's epochs 2 -> 3), "best_siglip_collapsed" (the checkpoint SigLIP
    prefers is collapsed while another is not).
    """
    warnings = []
    collapsed = [r for r in rows if r["status"] == "collapsed"]
    if collapsed:
        names = ", ".join(f"{r['name']} ({', '.join(r['tripped'])})" for r in collapsed)
        warnings.append({"code": "collapsed", "message": f"{len(collapsed)} of {len(rows)} checkpoints are "
                         f"collapsed (a guard rule tripped): {names}."})
    if _finite(correlation) and correlation < 0:
        warnings.append({"code": "siglip_diversity_negative", "message": (
            f"SigLIP and diversity move in opposite directions across these checkpoints (Spearman rho = "
            f"{correlation:.2f}). A higher SigLIP score is not a better model here: generic captions that "
            "fit every video score well while saying nothing specific. Choose by diversity, grounding R@1 "
            "and the references, not by SigLIP.")})
    steps = [(a, b) for a, b in zip(rows, rows[1:], strict=False)
             if _same_run(a, b) and all(_finite(r[k]) for r in (a, b) for k in ("siglip_mean", "diversity"))
             and b["siglip_mean"] > a["siglip_mean"] and b["diversity"] < a["diversity"]]
    if steps:
        listed = "; ".join(f"{a['name']} -> {b['name']}: SigLIP {a['siglip_mean']:.3f} -> "
                           f"{b['siglip_mean']:.3f}, diversity {a['diversity']:.2f} -> {b['diversity']:.2f}"
                           for a, b in steps)
        warnings.append({"code": "siglip_up_diversity_down", "message": (
            f"SigLIP rose while diversity fell ({listed}). This is the field report's trap: the model is "
            "converging on safe, generic captions.")})
    scored = [r for r in rows if _finite(r["siglip_mean"])]
    if len(scored) > 1:
        best = max(scored, key=lambda r: r["siglip_mean"])
        if best["status"] == "collapsed" and any(r["status"] == "ok" for r in rows):
            warnings.append({"code": "best_siglip_collapsed", "message": (
                f"The checkpoint with the highest SigLIP ({best['name']}, {best['siglip_mean']:.2f}) is "
                "collapsed: do not pick checkpoints by SigLIP alone.")})
    return warnings


def _same_run(a: dict, b: dict) -> bool:
    """Consecutive rows are epochs of one run when their checkpoints share a parent dir (or have no path)."""
    if not a.get("path") or not b.get("path"):
        return True
    return Path(a["path"]).parent == Path(b["path"]).parent


def build_report(rows: Sequence[dict], dataset: dict | None = None, run: dict | None = None,
                 extra_warnings: Sequence[dict] = ()) -> dict:
    """The report dict (what report.json holds) from rows in checkpoint order.

    Example: three rows with siglip_mean 0.1 -> 0.2 -> 0.4 and diversity 0.9 -> 0.6 -> 0.2 -> correlation
    rho -1.0 and warnings with codes "collapsed" (if the last collapsed), "siglip_diversity_negative",
    "siglip_up_diversity_down", "best_siglip_collapsed". With fewer than 3 such rows rho is None and
    correlation["note"] says why (two points always rank-correlate +-1).
    """
    rows = list(rows)
    pairs = sum(_finite(r["siglip_mean"]) and _finite(r["diversity"]) for r in rows)
    correlation = {"method": "spearman", "rho": None, "n": pairs}
    if pairs >= MIN_CORRELATION_POINTS:
        correlation["rho"] = spearman([r["siglip_mean"] for r in rows], [r["diversity"] for r in rows])
    else:   # the ranks of 2 points always correlate +-1: a sign, not a measurement
        correlation["note"] = (f"not meaningful with {pairs} checkpoint(s) that have SigLIP and diversity; "
                               f"a rank correlation needs at least {MIN_CORRELATION_POINTS}")
    return _jsonable({
        "version": REPORT_VERSION,
        "dataset": dict(dataset or {}),
        "run": dict(run or {}),
        "checkpoints": rows,
        "verdicts": {r["name"]: r["status"] for r in rows},
        "fingerprints": {r["name"]: r.get("fingerprint") for r in rows},
        "correlation": {"siglip_mean_vs_diversity": correlation},
        "warnings": [*extra_warnings, *report_warnings(rows, correlation["rho"])],
    })


# ---------------------------------------------------------------------------------------------------
# Running checkpoints over a data set


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
                 max_new_tokens: int | None = None, max_frame_bytes: int = 4 * 2**30):
        from capguard.models.stack import ComponentCache

        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.dataset, self.out_dir = dataset, Path(out_dir)
        self.num_frames, self.batch_size, self.device = num_frames, batch_size, device
        self.max_new_tokens = max_new_tokens     # None: each checkpoint's generation default
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
        num_frames = self.num_frames or stack.config.num_frames
        items = self.dataset.items
        kept: list[int] = []
        captions: list[str] = []
        scores: list[float | None] = []
        text_emb, video_emb = [], []
        stages = Counter()
        bar = tqdm(total=len(items), desc=name, unit="video", disable=not self.progress_bar)
        for first in range(0, len(items), self.batch_size):
            batch = range(first, min(first + self.batch_size, len(items)))
            decoded = [(i, self.frames.get(i, items[i], num_frames, stack.frame_side)) for i in batch]
            decoded = [(i, f) for i, f in decoded if f is not None]
            if decoded:
                budget = None if self.max_new_tokens is None else [self.max_new_tokens] * len(decoded)
                outputs, seconds = stack.caption([f for _, f in decoded], max_new_tokens=budget)
                stages.update(seconds)
                for (i, _), out in zip(decoded, outputs, strict=True):
                    kept.append(i)
                    captions.append(out.caption)
                    scores.append(out.score)
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
            lang=self.dataset.lang, ids=[it.id for it in chosen], thresholds=thresholds, info=info)
        self.rows.append(row)
        self.records += [{"checkpoint": name, "id": it.id, "path": it.rel, "caption": c,
                          "reference": it.reference, "siglip": s}
                         for it, c, s in zip(chosen, captions, scores, strict=True)]
        log.info("%s: %d/%d unique (%.2f) | near %d | top mode %.2f | SigLIP %s | R@1 %s | %s %s", name,
                 row["unique"], row["n"], row["diversity"], row["near_unique"], row["top_mode_share"],
                 _fmt(row["siglip_mean"]), _fmt(row["grounding_r1"]), row["status"], ",".join(row["tripped"]))
        del stack
        _evict_private(self.cache, directory.resolve(), set(keep))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.write()
        return row

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
    return f"{value:.3f}" if _finite(value) else "-"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _evict_private(cache, directory: Path, keep: set[Path]) -> None:
    """Drop cached components that live inside one checkpoint's directory (a stage-2 epoch's own LLM copy)
    unless a later checkpoint uses them (keep); ../shared components stay for the next epoch."""
    for store in (cache.open_clip, cache.llms):
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
             frame_loader: FrameLoader | None = None) -> dict:
    """Caption every video with every checkpoint, write report.json, captions.jsonl and report.html, and
    return the report.

    videos: a manifest, a directory of videos, or a Dataset from load_dataset. progress_callback(done, total)
    is called after every batch (videos captioned so far, over all checkpoints). num_frames, max_new_tokens:
    default each checkpoint's own. thresholds: as in ``watch``. frame_loader(path, num_frames, max_side) ->
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
                          expected_checkpoints=len(checkpoint_dirs), max_new_tokens=max_new_tokens)
    for i, directory in enumerate(checkpoint_dirs):
        evaluator.add(directory, keep=set().union(*components[i + 1:]))
    return evaluator.write()


# ---------------------------------------------------------------------------------------------------
# Watching a training run


def find_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Checkpoint dirs (holding capguard.json) one or two levels below directory, in natural order.

    Two levels, so both a run dir (run/epoch-N) and a training output root (out/run/epoch-N) work.
    Example: run/epoch-10, run/epoch-2 -> [run/epoch-2, run/epoch-10].
    """
    root = Path(directory)
    patterns = (f"*/{MANIFEST_NAME}", f"*/*/{MANIFEST_NAME}")
    found = {p.parent for pattern in patterns for p in root.glob(pattern)}

    def order(path: Path) -> tuple:
        return [natural_key(part) for part in path.relative_to(root).parts], path.stat().st_mtime

    return sorted(found, key=order)


def _signature(directory: Path) -> tuple | None:
    """(relative path, size, mtime_ns) of every file in a checkpoint dir; None while it cannot be read."""
    entries = []
    try:
        for path in directory.rglob("*"):
            if path.is_file():
                st = path.stat()
                entries.append((path.relative_to(directory).as_posix(), st.st_size, st.st_mtime_ns))
    except OSError:   # a file vanished between listing and stat: still being written
        return None
    return tuple(sorted(entries))


def watch(directory: str | os.PathLike, videos: str | os.PathLike | Dataset, out_dir: str | os.PathLike, *,
          interval: float = 30.0, once: bool = False, max_checkpoints: int | None = None,
          stop: threading.Event | None = None, references: str = "auto", limit: int | None = None,
          **options) -> dict:
    """Evaluate each checkpoint a training run writes under directory, extending one report.

    A checkpoint is taken once its files are unchanged (names, sizes, mtimes) between two polls
    ``interval`` seconds apart, so a half-written capguard.json or projector is never loaded. Rows already
    in out_dir/report.json for the same data set are kept, not recomputed. A checkpoint that fails to load
    is reported in the warnings and retried only if its files change. Rows are named by their path under
    directory ("mlp/epoch-3"), so several runs in one output root stay apart. Stops after
    ``max_checkpoints`` new rows, when ``stop`` is set, or (``once``) after two polls; otherwise runs until
    interrupted.
    options: Evaluator keywords (num_frames, batch_size, device, thresholds, progress_callback, ...).
    thresholds left out: each checkpoint is judged by the defaults updated by its capguard.json guard
    section, as the server does; given: they apply to every checkpoint (explicit settings win).
    """
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"--watch {directory}: not a directory; pass the training run's output dir")
    dataset = videos if isinstance(videos, Dataset) else load_dataset(videos, references, limit)
    evaluator = Evaluator(dataset, out_dir, **options)
    kept = evaluator.resume()
    done = {Path(r["path"]).resolve() for r in evaluator.rows}
    if kept:
        log.info("kept %d rows of the earlier report in %s", kept, out_dir)
    evaluator.write()
    failed: dict[Path, tuple] = {}
    previous: dict[Path, tuple | None] = {}
    added, polls = 0, 0
    stop = stop or threading.Event()
    log.info("watching %s for checkpoints every %.0f s", root, interval)
    while not stop.is_set():
        current = {c: _signature(c) for c in find_checkpoints(root) if c.resolve() not in done}
        ready = [c for c, sig in current.items()
                 if sig is not None and previous.get(c) == sig and failed.get(c) != sig]
        previous = current
        for checkpoint in ready:
            try:
                evaluator.add(checkpoint.resolve(), name=checkpoint.relative_to(root).as_posix())
            except Exception as exc:  # noqa: BLE001 - one bad checkpoint must not end a days-long watch
                failed[checkpoint] = current[checkpoint]
                log.error("cannot evaluate %s: %s", checkpoint, exc)
                evaluator.extra_warnings.append({"code": "checkpoint_failed",
                                                 "message": f"{checkpoint} could not be evaluated: {exc}"})
                evaluator.write()
                continue
            done.add(checkpoint.resolve())
            added += 1
            if max_checkpoints is not None and added >= max_checkpoints:
                return evaluator.write()
        polls += 1
        if once and polls >= 2:
            break
        stop.wait(interval)
    return evaluator.write()


__all__ = [
    "Dataset", "Evaluator", "ROW_KEYS", "VideoItem", "build_report", "caption_tokens", "checkpoint_row",
    "cider_d", "component_paths", "evaluate", "find_checkpoints", "load_dataset", "natural_key",
    "rank_average", "reference_metrics", "report_warnings", "spearman", "watch",
]
