"""Metrics that need references or several checkpoints: BLEU and chrF (sacrebleu), CIDEr-D (hand-written,
see ``cider_d``), attribute accuracy (capguard.models.synth) and a Spearman rank correlation (numpy).

Every diversity figure comes from capguard.models.diversity instead, the functions the live guard uses."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np
import sacrebleu
from sacrebleu.metrics import BLEU, CHRF

from capguard.models.diversity import normalize_caption


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
    pairs = [(a, b) for a, b in zip(x, y, strict=True) if is_finite(a) and is_finite(b)]
    if len(pairs) < 2:
        return math.nan
    rx = rank_average([a for a, _ in pairs])
    ry = rank_average([b for _, b in pairs])
    dx, dy = rx - rx.mean(), ry - ry.mean()
    denominator = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(dx @ dy) / denominator if denominator > 0 else math.nan


def is_finite(value) -> bool:
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
