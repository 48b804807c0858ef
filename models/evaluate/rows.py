"""Rows and the report: pure functions of captions and scores (the tests drive them without a model).

One row per checkpoint, judged by the live guard's own rules (capguard.models.rules), and the report that
puts the rows side by side with the SigLIP-vs-diversity relation and its warnings."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from capguard.models.diversity import diversity_report
from capguard.models.evaluate.dataset import has_hangul
from capguard.models.evaluate.metrics import attribute_scores, is_finite, reference_metrics, spearman
from capguard.models.jsonable import jsonable
from capguard.models.rules import GuardThresholds, tripped_rules

REPORT_VERSION = 1
MIN_CORRELATION_POINTS = 3   # checkpoints with SigLIP and diversity before the Spearman figure is reported


ROW_KEYS = (
    "name", "path", "fingerprint", "projector_type", "epoch", "n", "unique", "diversity", "near_unique",
    "near_unique_ratio", "top_mode_share", "top_mode", "repeat_probability", "distinct_1", "distinct_2",
    "self_bleu", "content_unique_ratio", "vendi_score", "degenerate_share", "repetition_stops", "siglip_mean",
    "siglip_median", "grounding_r1", "grounding_margin", "bleu", "chrf", "cider_d", "attribute_accuracy", "attribute_accuracy_by_name", "status", "tripped", "thresholds", "modes",
    "num_frames", "seconds", "timings_s",
)


def checkpoint_row(name: str, captions: Sequence[str], *, scores: Sequence[float | None] | None = None,
                   text_emb: np.ndarray | None = None, video_emb: np.ndarray | None = None,
                   references: Sequence[str | None] | None = None,
                   attributes: Sequence[dict | None] | None = None, lang: str | None = None,
                   ids: Sequence[str] | None = None, thresholds: GuardThresholds | None = None,
                   info: dict | None = None, top_k: int = 5,
                   degenerate: Sequence[str | None] | None = None,
                   finish_reasons: Sequence[str | None] | None = None) -> dict:
    """One checkpoint's report row (keys: ROW_KEYS) from its captions of the data set, in data set order.

    scores: SigLIP probability per caption (None: no scorer). text_emb/video_emb: (n, E) scorer embeddings
    for grounding and the Vendi score. degenerate: the degeneration kind (or None) per caption, computed with
    its token counts (capguard.models.degenerate); None: judged from the text alone. finish_reasons: why each
    caption ended ("stop", "length", "repetition": the stop_on_repetition option cut a loop), counted in
    ``repetition_stops``; None (captions written by other code): not known, and the count is None.
    references/attributes: per video, None where absent. ids: video ids, to name a mode's videos. info: path, fingerprint, ... copied into the row. Verdict: "collapsed" if any guard rule of
    thresholds (default GuardThresholds()) trips; the row records the thresholds it was judged by.

    Example: checkpoint_row("e4", ["같은 말"] * 97) -> unique 1, diversity 0.0103, status "collapsed",
    tripped ["unique_ratio", "near_unique_ratio", "top_mode_share"], top_mode "같은 말", top_mode_share 1.0.
    """
    thresholds = thresholds or GuardThresholds()
    report = diversity_report(list(captions), text_emb, video_emb, top_k=top_k,
                              near_dup_threshold=thresholds.near_dup_threshold, degenerate=degenerate)
    tripped = tripped_rules(report, thresholds)
    siglip = [s for s in (scores or []) if is_finite(s)]
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
        "content_unique_ratio": d["content_unique_ratio"], "vendi_score": d["vendi_score"],
        "degenerate_share": d["degenerate_share"],
        "repetition_stops": None if finish_reasons is None else sum(r == "repetition" for r in finish_reasons),
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
    return jsonable(row)


def _guess_lang(captions: Iterable[str]) -> str:
    return "ko" if any(has_hangul(c) for c in captions) else "en"


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
    if is_finite(correlation) and correlation < 0:
        warnings.append({"code": "siglip_diversity_negative", "message": (
            f"SigLIP and diversity move in opposite directions across these checkpoints (Spearman rho = "
            f"{correlation:.2f}). A higher SigLIP score is not a better model here: generic captions that "
            "fit every video score well while saying nothing specific. Choose by diversity, grounding R@1 "
            "and the references, not by SigLIP.")})
    steps = [(a, b) for a, b in zip(rows, rows[1:], strict=False)
             if _same_run(a, b) and all(is_finite(r[k]) for r in (a, b) for k in ("siglip_mean", "diversity"))
             and b["siglip_mean"] > a["siglip_mean"] and b["diversity"] < a["diversity"]]
    if steps:
        listed = "; ".join(f"{a['name']} -> {b['name']}: SigLIP {a['siglip_mean']:.3f} -> "
                           f"{b['siglip_mean']:.3f}, diversity {a['diversity']:.2f} -> {b['diversity']:.2f}"
                           for a, b in steps)
        warnings.append({"code": "siglip_up_diversity_down", "message": (
            f"SigLIP rose while diversity fell ({listed}). This is the field report's trap: the model is "
            "converging on safe, generic captions.")})
    scored = [r for r in rows if is_finite(r["siglip_mean"])]
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
    pairs = sum(is_finite(r["siglip_mean"]) and is_finite(r["diversity"]) for r in rows)
    correlation = {"method": "spearman", "rho": None, "n": pairs}
    if pairs >= MIN_CORRELATION_POINTS:
        correlation["rho"] = spearman([r["siglip_mean"] for r in rows], [r["diversity"] for r in rows])
    else:   # the ranks of 2 points always correlate +-1: a sign, not a measurement
        correlation["note"] = (f"not meaningful with {pairs} checkpoint(s) that have SigLIP and diversity; "
                               f"a rank correlation needs at least {MIN_CORRELATION_POINTS}")
    return jsonable({
        "version": REPORT_VERSION,
        "dataset": dict(dataset or {}),
        "run": dict(run or {}),
        "checkpoints": rows,
        "verdicts": {r["name"]: r["status"] for r in rows},
        "fingerprints": {r["name"]: r.get("fingerprint") for r in rows},
        "correlation": {"siglip_mean_vs_diversity": correlation},
        "warnings": [*extra_warnings, *report_warnings(rows, correlation["rho"])],
    })
