"""Diversity and collapse metrics: the one implementation behind the live guard, evaluation and training.

The field report (docs/field-report.en.md) taught four things, and each has a metric here:
- hard collapse (97 videos, 1 distinct caption) -> ``unique_ratio`` on normalized captions;
- near-duplicate collapse (epochs 5-6: "...낮의 풍경을..." vs "...낮의 광경을...") that exact matching
  misses -> ``cluster_near_duplicates`` / ``near_unique_ratio`` / ``top_mode_share``;
- SigLIP rises while diversity falls, so a caption must also pick out *its own* video among the
  window's videos -> ``grounding`` (R@1 and margin on scorer embeddings);
- corpus-level repetition in softer forms -> ``repeat_probability``, ``distinct_n``, ``self_bleu``.

``diversity_report`` computes all of them once; ``capguard.models.rules.tripped_rules`` applies
``GuardThresholds`` to its report.

Conventions: every count works on ``caption_key`` (normalized, spaces removed; see
``normalize_caption`` for why). A metric that is undefined for its input (no captions, no n-grams,
fewer than two captions to compare) returns ``nan``; ``nan`` never trips a guard rule and becomes
``null`` in ``DiversityReport.to_dict``. Nothing here imports torch: inputs are strings and numpy arrays.
"""

from __future__ import annotations

import bisect
import functools
import logging
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import Indel
from sacrebleu.metrics.bleu import BLEU
from sacrebleu.metrics.helpers import extract_all_word_ngrams

from capguard.models.jsonable import jsonable
from capguard.models.rules import NEAR_DUP_THRESHOLD, check_near_dup_threshold

logger = logging.getLogger(__name__)

NAN = float("nan")

# ---------------------------------------------------------------------------------------------------------
# Normalization


class _StripTable(dict):
    """str.translate table: punctuation (P*), symbols (S*) and control/format (C*) -> space, else kept.

    Filled lazily per code point, so normalizing 10,000 captions costs one category lookup per distinct char.
    """

    def __missing__(self, codepoint: int) -> int:
        category = unicodedata.category(chr(codepoint))
        self[codepoint] = 0x20 if category[0] in "PSC" else codepoint
        return self[codepoint]


_STRIP = _StripTable()


def normalize_caption(text: str, *, keep_spaces: bool = True) -> str:
    """Canonical form of a caption for counting: NFC, casefolded, no punctuation/symbols, one space per gap.

    Steps: canonical caseless form (NFC of casefold of NFD, so NFD Hangul from a macOS file equals NFC
    Hangul), then every Unicode P*/S* character (and C* control/format such as zero-width spaces) becomes
    a space, then whitespace runs collapse to one space and the ends are stripped.

    ``keep_spaces=False`` is the spacing-insensitive form (``caption_key``). Every count in this module
    (exact-unique, Good-Turing, the keys that near-duplicate clustering compares) uses it, because Korean
    word spacing (띄어쓰기) varies between generations of the same sentence ("낮의 풍경" / "낮의풍경"), and
    a model that only varies spacing is still collapsed. The cost is that English captions identical letter
    for letter but spaced differently ("a part" / "apart") count as one; for a collapse detector that is
    harmless (it can only merge strings with identical letters).

    Example: "맑고,  화창한 낮의 풍경!" -> "맑고 화창한 낮의 풍경"; keep_spaces=False -> "맑고화창한낮의풍경";
    "A Clear-Sky SCENE." -> "a clear sky scene".
    """
    if not isinstance(text, str):
        raise TypeError(f"captions must be str, got {type(text).__name__}: {text!r}; convert or drop it first")
    return _normalize(text, keep_spaces)


@functools.lru_cache(maxsize=2**16)  # a report normalizes each caption several times; collapsed windows repeat
def _normalize(text: str, keep_spaces: bool) -> str:
    folded = unicodedata.normalize("NFC", unicodedata.normalize("NFD", text).casefold())
    words = folded.translate(_STRIP).split()
    return " ".join(words) if keep_spaces else "".join(words)


def caption_key(text: str) -> str:
    """The identity under which captions are counted: ``normalize_caption(text, keep_spaces=False)``.

    Example: "낮의 풍경을." and "낮의풍경을" -> both "낮의풍경을".
    """
    return normalize_caption(text, keep_spaces=False)


def _keys(captions: Sequence[str]) -> list[str]:
    if isinstance(captions, str):
        raise TypeError("captions must be a sequence of str, got one str; wrap it in a list")
    return [caption_key(c) for c in captions]


# ---------------------------------------------------------------------------------------------------------
# Exact repetition


def unique_ratio(captions: Sequence[str]) -> float:
    """Distinct captions / captions, after ``caption_key`` normalization (the field report's "diversity").

    n == 0 -> nan (undefined; nan never trips a rule, and the guard gives no verdict below 30 anyway).

    Example: captions=["a", "a", "b"] -> 2/3 = 0.667; ["낮의 풍경.", "낮의풍경"] -> 0.5.
    """
    keys = _keys(captions)
    return len(set(keys)) / len(keys) if keys else NAN


def repeat_probability(captions: Sequence[str]) -> float:
    """Good-Turing probability that the next caption repeats one already seen: 1 - f1 / n.

    f1 = number of normalized captions seen exactly once (the Good-Turing estimate of the unseen mass is
    f1 / n). A healthy captioner (all distinct) gives 0; one caption for every video gives 1.
    n == 0 -> nan.

    Example: captions=["a", "a", "b"] -> f1 = 1 ("b"), 1 - 1/3 = 0.667; ["a", "b", "c"] -> 0.0;
    ["a", "a", "a"] -> 1.0.
    """
    keys = _keys(captions)
    return _repeat_probability(Counter(keys), len(keys))


def _repeat_probability(counts: Counter, n: int) -> float:
    """1 - f1 / n from the key counts of n captions (nan when n == 0)."""
    if not n:
        return NAN
    return 1.0 - sum(1 for count in counts.values() if count == 1) / n


def distinct_n(captions: Sequence[str], n: int, unit: str = "syllable") -> float:
    """Distinct n-grams / total n-grams, pooled over all captions (n-grams never cross two captions).

    ``unit="syllable"``: characters of the spacing-free key (Hangul syllables; for Latin text, letters).
    ``unit="word"``: whitespace tokens of the normalized caption. No n-grams at all (every caption shorter
    than n) -> nan. Hand-written: no maintained library computes distinct-n (a Counter is all it takes).

    Example: captions=["ab", "ab"], n=1 -> units a, b, a, b -> 2 distinct / 4 = 0.5;
    n=2 -> "ab", "ab" -> 1/2 = 0.5; ["a b c", "a b d"], n=2, unit="word" -> {ab, bc, bd} 3 / 4 = 0.75.
    """
    if n < 1:
        raise ValueError(f"distinct_n needs n >= 1, got {n}")
    if unit == "syllable":
        sequences = _keys(captions)
    elif unit == "word":
        sequences = [normalize_caption(c).split() for c in captions]
    else:
        raise ValueError(f"unknown unit {unit!r}; use 'syllable' or 'word'")
    ngrams: set = set()
    total = 0
    for seq in sequences:
        grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
        ngrams.update(grams)
        total += len(grams)
    return len(ngrams) / total if total else NAN


# ---------------------------------------------------------------------------------------------------------
# Near-duplicate modes


@dataclass
class Mode:
    """One cluster of near-identical captions: what the guard shows as "the model keeps saying this"."""

    representative: str  # the most frequent original (un-normalized) text in the cluster, for humans to read
    count: int           # captions in the cluster (with repeats), the numerator of its share
    share: float         # count / n: top_mode_share is the largest of these
    members: list[int]   # indices into the input caption list, ascending, so callers can find the videos
    variants: int = 1    # distinct normalized captions in the cluster: > 1 means near-duplicate collapse


# Leader clustering compares each new key with every leader so far, in rapidfuzz's C cdist, a block of keys at
# a time; only the per-key argmax runs in Python. Indel similarity >= t needs the shorter string to be at
# least t / (2 - t) of the longer (0.82 at t = 0.9), so each length-sorted slice of a block is compared only
# with the leaders of compatible length: pairs that cannot match are never scored (28M instead of 50M pairs
# for 10,000 distinct Hangul captions of 8-48 syllables, where even a hopeless pair costs ~100 ns in cdist).
_CLUSTER_BLOCK = 256  # keys per block (frequency order)
_LENGTH_SLICE = 32    # keys per length-sorted slice of a block
# Similarities are fractions (0.9 = 18/20) that float rounding can put a hair under the threshold (rapidfuzz's
# own score_cutoff drops 34/40 at 0.85), so "sim >= threshold" is tested as sim >= threshold - _SIM_SLACK.
_SIM_SLACK = 1e-9
_PARALLEL_PAIRS = 50_000  # cdist uses all cores from this many pairs up


def _similarity_matrix(queries: list[str], choices: list[str], threshold: float) -> np.ndarray:
    """Indel normalized similarity, (len(queries), len(choices)) float64; values well below threshold are 0."""
    if not queries or not choices:
        return np.zeros((len(queries), len(choices)))
    # the cutoff only lets rapidfuzz skip hopeless pairs; its own float test is too strict at the boundary
    # one thread for small matrices: starting the pool costs more than a (1, 100) matrix (0.2 ms vs 20 us)
    workers = -1 if len(queries) * len(choices) >= _PARALLEL_PAIRS else 1
    return process.cdist(queries, choices, scorer=Indel.normalized_similarity,
                         score_cutoff=max(threshold - 1e-6, 0.0), dtype=np.float64, workers=workers)


def _best_leaders(block: list[str], leader_keys: np.ndarray, leader_lens: np.ndarray,
                  threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """For each key of the block: (best similarity >= threshold or 0, leader index or -1); ties -> lower index.

    leader_keys: (L,) object array of leader strings, leader_lens: (L,) their lengths.
    Example: block=["aaaaaaaaab"], leaders ["bbbbbbbbbb", "aaaaaaaaaa"] -> ([0.9], [1]).
    """
    best_sim = np.zeros(len(block))
    best = np.full(len(block), -1)
    if not len(leader_keys):
        return best_sim, best
    lens = np.array([len(k) for k in block])
    order = np.argsort(lens, kind="stable")
    low, high = threshold / (2.0 - threshold), (2.0 - threshold) / threshold
    for start in range(0, len(order), _LENGTH_SLICE):
        rows = order[start:start + _LENGTH_SLICE]  # (s,) block rows of similar length
        fits = (leader_lens >= lens[rows].min() * low - 1e-9) & (leader_lens <= lens[rows].max() * high + 1e-9)
        candidates = np.flatnonzero(fits)           # (c,) ascending, so argmax keeps the earliest leader
        if not len(candidates):
            continue
        sim = _similarity_matrix([block[r] for r in rows], leader_keys[candidates].tolist(), threshold)  # (s, c)
        j = sim.argmax(axis=1)
        top = sim[np.arange(len(rows)), j]
        hit = top >= threshold - _SIM_SLACK
        best_sim[rows[hit]] = top[hit]
        best[rows[hit]] = candidates[j[hit]]
    return best_sim, best


def _leader_clusters(keys: list[str], threshold: float) -> list[int]:
    """Leader clustering of distinct keys (already in priority order) -> cluster id per key.

    Each key joins the most similar existing leader with similarity >= threshold (ties: the earlier,
    i.e. more frequent, leader), else founds a cluster and becomes its leader. No chaining: a key close to a
    member but not to the leader founds its own cluster.

    Example: keys=["aaaaaaaaaa", "bbbbbbbbbb", "aaaaaaaaab"], threshold=0.9 -> [0, 1, 0].
    """
    cluster_of = [0] * len(keys)
    leader_keys = np.empty(len(keys), dtype=object)  # (n,) filled up to n_leaders; cluster id = position
    leader_lens = np.empty(len(keys), dtype=np.int64)
    n_leaders = 0
    for start in range(0, len(keys), _CLUSTER_BLOCK):
        block = keys[start:start + _CLUSTER_BLOCK]
        n_old = n_leaders
        old_sim, old_best = _best_leaders(block, leader_keys[:n_old], leader_lens[:n_old], threshold)  # (b,)
        within = _similarity_matrix(block, block, threshold)  # (b, b): leaders founded inside this block
        new_rows: list[int] = []  # rows of this block that founded a cluster, in order
        for r in range(len(block)):
            best_sim, best = old_sim[r], int(old_best[r])
            if new_rows:
                sims = within[r, new_rows]
                j = int(np.argmax(sims))
                if sims[j] >= threshold - _SIM_SLACK and sims[j] > best_sim:
                    best = n_old + j
            if best < 0:
                best = n_leaders
                leader_keys[n_leaders], leader_lens[n_leaders] = block[r], len(block[r])
                n_leaders += 1
                new_rows.append(r)
            cluster_of[start + r] = best
    return cluster_of


class SimilarityCache:
    """Pairwise similarities of a changing set of distinct caption keys, for clustering a rolling window.

    ``cluster_near_duplicates`` over a window of n captions scores O(n x leaders) pairs every time; a live
    window changes by one caption per observation, so almost all of those pairs were scored last time.
    ``sync(keys)`` drops the keys that left and scores only the new keys against the rest (one
    (new, all) ``cdist``), and ``_cached_leader_clusters`` reads the stored matrix. The clusters are the
    same as the uncached path's (same scorer, same values, same ties; tested on random windows).

    Memory: a dense float64 matrix over the distinct keys (grown by doubling), 8 * k^2 bytes: ~130 KB at 100,
    32 MB at 2,000. Meant for windows up to a few thousand; larger windows should recompute rarely and
    cluster without a cache (the guard does, see ``server/guard.py``).
    """

    def __init__(self, threshold: float):
        check_near_dup_threshold(threshold)
        self.threshold = threshold
        self._slot: dict[str, int] = {}       # key -> its row/column in _sim
        self._free: list[int] = []            # rows/columns of keys that left, reused first
        self._sim = np.zeros((0, 0))          # (capacity, capacity) Indel similarity, 0 where below threshold

    def __len__(self) -> int:
        return len(self._slot)

    def sync(self, keys: Sequence[str]) -> None:
        """Make the cached set equal the distinct ``keys``: forget the ones that left, score the new ones.

        Example: sync(["ab", "ac"]) scores 1 pair; then sync(["ac", "ad"]) forgets "ab", scores "ad" vs "ac".
        """
        current = dict.fromkeys(keys)
        for key in [k for k in self._slot if k not in current]:
            self._free.append(self._slot.pop(key))
        added = [k for k in current if k not in self._slot]
        if not added:
            return
        need = len(self._slot) + len(added)
        if need > self._sim.shape[0]:
            capacity = max(need, 2 * self._sim.shape[0], 16)
            grown = np.zeros((capacity, capacity))
            old = self._sim.shape[0]
            grown[:old, :old] = self._sim
            self._free.extend(range(capacity - 1, old - 1, -1))   # popped from the end: lowest first
            self._sim = grown
        for key in added:
            self._slot[key] = self._free.pop()
        every = list(self._slot)                                      # (k,) the new keys included
        rows = np.array([self._slot[k] for k in added])               # (a,)
        cols = np.array([self._slot[k] for k in every])               # (k,)
        sim = _similarity_matrix(added, every, self.threshold)        # (a, k)
        self._sim[np.ix_(rows, cols)] = sim
        self._sim[np.ix_(cols, rows)] = sim.T

    def submatrix(self, keys: Sequence[str]) -> np.ndarray:
        """(k, k) similarities among ``keys`` (all of them synced), in their order."""
        slots = np.array([self._slot[k] for k in keys], dtype=np.int64)
        return self._sim[np.ix_(slots, slots)]


def _cached_leader_clusters(keys: list[str], cache: SimilarityCache) -> list[int]:
    """``_leader_clusters`` on similarities from a synced cache: same contract, same result.

    Each key (in priority order) joins the most similar earlier leader with sim >= threshold (ties: the
    lower cluster id, i.e. the earlier leader), else founds a cluster.
    """
    sim = cache.submatrix(keys)                                        # (k, k) in priority order
    rows, cols = np.nonzero(np.tril(sim, -1) >= cache.threshold - _SIM_SLACK)  # row-major: cols ascend per row
    values = sim[rows, cols].tolist()
    earlier: list[list[tuple[int, float]]] = [[] for _ in keys]      # row -> [(earlier position, sim)]
    for r, c, v in zip(rows.tolist(), cols.tolist(), values, strict=True):
        earlier[r].append((c, v))
    cluster_at: dict[int, int] = {}                                    # position of a leader -> its cluster id
    cluster_of = []
    for r in range(len(keys)):
        best, best_sim = -1, 0.0
        for c, v in earlier[r]:
            if c in cluster_at and v > best_sim:   # ascending c and strict >: ties keep the earlier leader
                best, best_sim = cluster_at[c], v
        if best < 0:
            best = cluster_at[r] = len(cluster_at)
        cluster_of.append(best)
    return cluster_of


def cluster_near_duplicates(captions: Sequence[str], threshold: float = NEAR_DUP_THRESHOLD) -> list[Mode]:
    """Group captions that are the same up to small edits; modes sorted by count (desc), then first index.

    Similarity is rapidfuzz ``Indel.normalized_similarity`` (= ``fuzz.ratio`` / 100) on ``caption_key``
    forms: 1 - (insertions + deletions) / (len_a + len_b). Chosen over normalized Levenshtein because
    (1) for a same-length swap of k syllables both give 1 - k/L, so "풍경"/"광경" scores alike, while
    (2) Indel divides by the *sum* of lengths, so a template caption plus or minus a short clause stays a
    near-duplicate, which is how template collapse looks; and (3) it is rapidfuzz's reference ratio with a
    bit-parallel LCS kernel, so a 10,000 x 10,000 comparison stays in C. Comparing spacing-free keys makes
    the score about syllables, not about where the spaces fell.

    Leader clustering: distinct keys ordered by frequency (ties: first appearance) each join the most
    similar existing leader with sim >= threshold, else found a cluster. Representative = the cluster's most
    frequent original text (ties: first seen).

    Example: ["aaaaaaaaaa"] * 3 + ["aaaaaaaaab", "bbbbbbbbbb", "bbbbbbbbbb"], threshold=0.9 ->
    [Mode("aaaaaaaaaa", 4, 0.667, [0, 1, 2, 3], variants=2), Mode("bbbbbbbbbb", 2, 0.333, [4, 5])]
    ("aaaaaaaaab" is 2 Indel edits from the leader: 1 - 2/20 = 0.9 >= 0.9).
    """
    check_near_dup_threshold(threshold)
    return _clusters(captions, _keys(captions), threshold)[1]


def _clusters(captions: Sequence[str], keys: list[str], threshold: float, cache: SimilarityCache | None = None,
              top_k: int | None = None) -> tuple[int, list[Mode]]:
    """(number of clusters, modes): all of them sorted as ``cluster_near_duplicates`` returns, or the first
    ``top_k`` only (their members and representatives are the costly part of a live window).

    keys: ``caption_key`` of each caption (the guard keeps them). cache: a ``SimilarityCache`` at
    ``threshold``, synced here to these keys; None scores the pairs afresh.
    """
    members_of: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        members_of.setdefault(key, []).append(i)
    # dicts keep first-appearance order and sorted() is stable, so ties stay in order of appearance
    distinct = sorted(members_of, key=lambda k: len(members_of[k]), reverse=True)
    if cache is None:
        cluster_of = _leader_clusters(distinct, threshold)
    else:
        if cache.threshold != threshold:
            raise ValueError(f"the similarity cache is for threshold {cache.threshold}, not {threshold}")
        cache.sync(distinct)
        cluster_of = _cached_leader_clusters(distinct, cache)

    grouped: dict[int, list[str]] = {}
    size: dict[int, int] = {}
    first: dict[int, int] = {}
    for key, cluster in zip(distinct, cluster_of, strict=True):
        grouped.setdefault(cluster, []).append(key)
        members = members_of[key]
        size[cluster] = size.get(cluster, 0) + len(members)
        first[cluster] = min(first.get(cluster, members[0]), members[0])
    # order: count (desc), then first member, without listing the members of every cluster
    ranked = [grouped[c] for c in sorted(grouped, key=lambda c: (-size[c], first[c]))]
    modes = []
    for cluster_keys in ranked[:top_k]:
        members = sorted(i for key in cluster_keys for i in members_of[key])
        texts = Counter(captions[i] for i in members)
        representative = max(texts, key=texts.__getitem__)  # first-seen text wins ties
        modes.append(Mode(representative, len(members), len(members) / len(keys), members, len(cluster_keys)))
    return len(grouped), modes


def near_unique_ratio(captions: Sequence[str], threshold: float = NEAR_DUP_THRESHOLD) -> float:
    """Near-duplicate clusters / captions: ``unique_ratio`` that does not count one-word variants twice.

    n == 0 -> nan.

    Example: ["a clear sunny daytime landscape of the city centre with tall grey buildings", the same with
    "scene", "POSCO E&C grey building"] -> 2 clusters / 3 = 0.667 (exact unique_ratio: 1.0).
    """
    modes = cluster_near_duplicates(captions, threshold)
    return len(modes) / len(captions) if len(captions) else NAN


def top_mode_share(captions: Sequence[str], threshold: float = NEAR_DUP_THRESHOLD) -> float:
    """Share of the largest near-duplicate cluster: "one caption in five is this one" at 0.2.

    n == 0 -> nan.

    Example: ["a", "a", "b", "c"] -> 2/4 = 0.5.
    """
    modes = cluster_near_duplicates(captions, threshold)
    return modes[0].share if modes else NAN


# ---------------------------------------------------------------------------------------------------------
# Self-BLEU


def self_bleu(captions: Sequence[str], max_n: int = 4, tokenize: str = "char",
              max_captions: int = 1000, seed: int = 0) -> float:
    """Corpus BLEU of every caption against all the others as references, in [0, 1] (sacrebleu score / 100).

    Equals ``sacrebleu.corpus_bleu(hyps, refs, tokenize=tokenize)`` with refs[k][i] = the k-th caption
    other than i (tests check parity). Plain corpus_bleu re-extracts n-1 references for each of n
    hypotheses, O(n^2) Python work (0.76 s at n=100, 3.6 s at n=200); here each caption's n-grams are
    extracted once with sacrebleu's own helper, the "max count over the other captions" that sacrebleu
    computes by merging references is read from the top-2 counts of each n-gram, and sacrebleu's
    ``BLEU.compute_bleu`` turns the statistics into the score (default 'exp' smoothing, as corpus_bleu).

    ``tokenize="char"`` (default): Hangul syllables are the units; sacrebleu's char tokenizer drops spaces,
    so the score ignores Korean spacing like every other metric here. ``ko-mecab`` would need MeCab;
    "intl"/"13a" work too but make a one-syllable particle change a whole-word miss. Input is
    ``normalize_caption`` text. Above ``max_captions`` captions, a fixed-seed random subset of that size is
    scored (documented sampling: the estimate is stable and the cost bounded). n < 2 -> nan.

    Example: ["같은 문장", "같은 문장"] -> 1.0 (each is the other's reference); captions sharing no
    character -> 0.0.
    """
    if max_n < 1:
        raise ValueError(f"self_bleu needs max_n >= 1, got {max_n}")
    texts = [normalize_caption(c) for c in captions]
    if len(texts) > max_captions:
        rng = np.random.default_rng(seed)
        picked = np.sort(rng.choice(len(texts), size=max_captions, replace=False))
        logger.debug("self_bleu: scoring a fixed-seed sample of %d of %d captions", max_captions, len(texts))
        texts = [texts[i] for i in picked]
    if len(texts) < 2:
        return NAN
    bleu = BLEU(tokenize=tokenize, max_ngram_order=max_n)
    counts, lengths = [], []
    for text in texts:
        grams, length = extract_all_word_ngrams(bleu.tokenizer(text.rstrip()), 1, max_n)
        counts.append(grams)
        lengths.append(length)

    # For each n-gram: its largest count, which caption holds it, and the runner-up count.
    top1: dict[tuple, int] = {}
    owner: dict[tuple, int] = {}
    top2: dict[tuple, int] = {}
    for i, grams in enumerate(counts):
        for gram, c in grams.items():
            best = top1.get(gram, 0)
            if c > best:
                top2[gram], top1[gram], owner[gram] = best, c, i
            elif c > top2.get(gram, 0):
                top2[gram] = c

    length_counts = Counter(lengths)
    distinct_lengths = sorted(length_counts)
    correct, total = [0] * max_n, [0] * max_n
    ref_len_sum = 0
    for i, grams in enumerate(counts):
        for gram, c in grams.items():
            total[len(gram) - 1] += c
            ref_max = top1[gram] if owner[gram] != i else top2.get(gram, 0)
            correct[len(gram) - 1] += min(c, ref_max)
        ref_len_sum += _closest_other_length(lengths[i], length_counts, distinct_lengths)
    score = BLEU.compute_bleu(correct, total, sum(lengths), ref_len_sum, smooth_method=bleu.smooth_method,
                              smooth_value=bleu.smooth_value, effective_order=bleu.effective_order,
                              max_ngram_order=max_n)
    return score.score / 100.0


def _closest_other_length(own: int, length_counts: Counter, distinct_lengths: list[int]) -> int:
    """sacrebleu's closest reference length (ties -> shorter) among the *other* captions' lengths.

    Example: own=5, lengths {5: 1, 3: 2, 7: 1} -> 3 (3 and 7 tie at distance 2; shorter wins).
    """
    if length_counts[own] > 1:
        return own
    pos = bisect.bisect_left(distinct_lengths, own)
    below = distinct_lengths[pos - 1] if pos > 0 else None
    above = distinct_lengths[pos + 1] if pos + 1 < len(distinct_lengths) else None
    if below is None:
        return above
    if above is None or own - below <= above - own:
        return below
    return above


# ---------------------------------------------------------------------------------------------------------
# Grounding

_TIE_TOL = 1e-5  # cosine differences below this are ties: float32 products of identical inputs differ by ~1e-6
_GROUNDING_ROWS = 512  # rows per block: a 10,000-caption window needs (512, 10000) float32 = 20 MB at a time


def _unit_rows(x: np.ndarray, name: str) -> np.ndarray:
    """(n, D) -> (n, D) float32 with unit rows (zero rows stay zero), normalized in float64."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be (n, D), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} has nan/inf entries; check the scorer's output")
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def grounding(text_emb: np.ndarray, video_emb: np.ndarray) -> tuple[float, float]:
    """Does each caption pick out its own video among the window's videos? -> (R@1, mean margin).

    text_emb, video_emb: (n, D), row i = caption i and the video it was generated for; rows are
    L2-normalized here whatever comes in. sim = text @ video.T (n, n), float32 (3-4x faster than float64
    on CPU, the whole cost at n=10,000), hence the 1e-5 tie tolerance.
    - R@1: share of captions i whose own video is the *strict* argmax of row i (by more than 1e-5) and
      whose text embedding is not a duplicate (cosine >= 1 - 1e-5) of another caption's. The second
      condition is what "ties are not a hit" means for a collapsed model: identical captions give identical
      text rows, so every video's column ties between them; without it, one caption of a collapsed group
      would still score a hit whenever its own video happened to be the one the generic text matches best.
      So a generic caption is never grounded, and R@1 <= (captions seen once) / n.
    - margin: mean over i of sim[i, i] - max_{j != i} sim[i, j] (> 0: captions prefer their own video).
    Chance level of R@1 is about 1/n. n < 2 -> (nan, nan): with one video there is nothing to pick from.

    Example: text = video = eye(3) -> (1.0, 1.0); text = eye(3)[[1, 2, 0]], video = eye(3) -> (0.0, -1.0);
    three identical text rows -> R@1 0.0.
    """
    text = _unit_rows(text_emb, "text_emb")     # (n, D)
    video = _unit_rows(video_emb, "video_emb")  # (n, D)
    if text.shape != video.shape:
        raise ValueError(f"text_emb {text.shape} and video_emb {video.shape} must have the same shape "
                         "(one row per caption and its own video)")
    n = text.shape[0]
    if n < 2:
        return NAN, NAN
    hits, margin_sum = 0, 0.0
    for start in range(0, n, _GROUNDING_ROWS):
        rows = np.arange(start, min(start + _GROUNDING_ROWS, n))  # (b,)
        diag = (np.arange(len(rows)), rows)
        sim = text[rows] @ video.T                                 # (b, n)
        own = sim[diag].astype(np.float64)                         # (b,)
        sim[diag] = -np.inf
        margin = own - sim.max(axis=1)                             # (b,)
        margin_sum += float(margin.sum())
        wins = rows[margin > _TIE_TOL]                             # (w,) only these can be hits
        if len(wins):
            same_text = text[wins] @ text.T                        # (w, n)
            same_text[np.arange(len(wins)), wins] = -np.inf
            hits += int(np.count_nonzero(same_text.max(axis=1) < 1.0 - _TIE_TOL))
    return hits / n, margin_sum / n


# ---------------------------------------------------------------------------------------------------------
# Report


@dataclass
class DiversityReport:
    """Every figure for one window or evaluation set; ``to_dict`` is what the API and reports serialize."""

    n: int                           # captions in the window
    unique: int                      # distinct normalized captions
    unique_ratio: float              # unique / n: hard collapse (the field report's diversity)
    near_unique: int                 # near-duplicate clusters
    near_unique_ratio: float         # near_unique / n: collapse onto one-word variants
    top_mode_share: float            # share of the largest cluster
    repeat_probability: float        # Good-Turing chance the next caption repeats a seen one
    distinct_1: float | None         # distinct syllables / syllables (None when not computed: the guard)
    distinct_2: float | None         # distinct syllable bigrams / bigrams
    self_bleu: float | None          # None when not computed (the live guard skips it)
    grounding_r1: float | None       # None without embeddings; nan below 2 captions
    grounding_margin: float | None   # same
    modes: list[Mode]                # the top_k clusters: what the model keeps saying
    near_dup_threshold: float = NEAR_DUP_THRESHOLD  # the similarity the clusters used, so a report explains itself
    # Distinct content-morpheme keys / captions (capguard.models.semantic); None when not computed
    content_unique_ratio: float | None = None
    # Vendi score of the text embeddings: effective number of captions by meaning (1..n); None without them
    vendi_score: float | None = None
    # Share of captions that loop inside themselves (capguard.models.degenerate.LOOP_KINDS); None: not computed
    degenerate_share: float | None = None

    def to_dict(self) -> dict:
        """JSON-able dict; nan becomes None (JSON has no nan).

        Example: DiversityReport(n=0, unique_ratio=nan, ...).to_dict()["unique_ratio"] -> None.
        """
        return jsonable(asdict(self))


def diversity_report(captions: Sequence[str], text_emb: np.ndarray | None = None,
                     video_emb: np.ndarray | None = None, near_dup_threshold: float = NEAR_DUP_THRESHOLD,
                     top_k: int = 5, with_self_bleu: bool = True, with_distinct_n: bool = True,
                     keys: list[str] | None = None, cache: SimilarityCache | None = None,
                     with_content: bool = True, content_keys: Sequence[str] | None = None,
                     degenerate: Sequence[str | None] | None = None) -> DiversityReport:
    """All metrics for one set of captions, normalizing and clustering once.

    Grounding and the Vendi score need the embeddings (row i = caption i / its video), else they are None.
    ``content_unique_ratio`` reads ``capguard.models.semantic.content_key`` of each caption (pass
    ``content_keys`` if already known; ``with_content=False`` skips it, and the ~10 s kiwipiepy load, -> None).
    ``degenerate_share`` reads the per-caption degeneration kinds (``degenerate``: one kind or None per
    caption, as the server computed them with the token counts), else ``degeneration(caption)`` of each.
    For a live window (the guard): ``keys`` = the captions' ``caption_key``s if already known, ``cache`` = a
    ``SimilarityCache`` kept between calls (only new captions are scored), ``with_self_bleu`` and
    ``with_distinct_n`` False to skip figures no rule reads (their fields are then None). Same figures.

    Example: diversity_report(["a", "a", "b"]) -> n=3, unique=2, unique_ratio=0.667, near_unique=2,
    top_mode_share=0.667, repeat_probability=0.667, modes=[Mode("a", 2, ...), Mode("b", 1, ...)].
    """
    if (text_emb is None) != (video_emb is None):
        raise ValueError("grounding needs both text_emb and video_emb (or neither)")
    check_near_dup_threshold(near_dup_threshold)
    if keys is None:
        keys = _keys(captions)
    elif len(keys) != len(captions):
        raise ValueError(f"{len(keys)} keys for {len(captions)} captions; pass caption_key(c) for each caption")
    n = len(keys)
    if text_emb is not None and len(text_emb) != n:
        raise ValueError(f"{len(text_emb)} embedding rows for {n} captions; pass one row per caption")
    if content_keys is not None and len(content_keys) != n:
        raise ValueError(f"{len(content_keys)} content keys for {n} captions; pass content_key(c) for each caption")
    if degenerate is not None and len(degenerate) != n:
        raise ValueError(f"{len(degenerate)} degeneration kinds for {n} captions; pass one (or None) per caption")
    # imported here: both modules build on this one's normalization
    from capguard.models.degenerate import degenerate_share, degeneration
    from capguard.models.semantic import content_key, vendi_score

    clusters, modes = _clusters(captions, keys, near_dup_threshold, cache, top_k)
    r1, margin = grounding(text_emb, video_emb) if text_emb is not None else (None, None)
    if content_keys is None and with_content:
        content_keys = [content_key(c) for c in captions]
    if degenerate is None:
        degenerate = [getattr(degeneration(c), "kind", None) for c in captions]
    counts = Counter(keys)
    unique = len(counts)
    return DiversityReport(
        n=n,
        unique=unique,
        unique_ratio=unique / n if n else NAN,
        near_unique=clusters,
        near_unique_ratio=clusters / n if n else NAN,
        top_mode_share=modes[0].share if modes else NAN,
        repeat_probability=_repeat_probability(counts, n),
        distinct_1=distinct_n(captions, 1) if with_distinct_n else None,
        distinct_2=distinct_n(captions, 2) if with_distinct_n else None,
        self_bleu=self_bleu(captions) if with_self_bleu else None,
        grounding_r1=r1,
        grounding_margin=margin,
        modes=modes,
        near_dup_threshold=near_dup_threshold,
        content_unique_ratio=(len(set(content_keys)) / n if n else NAN) if content_keys is not None else None,
        vendi_score=(vendi_score(text_emb) if n else NAN) if text_emb is not None else None,
        degenerate_share=degenerate_share(degenerate),
    )


__all__ = [
    "DiversityReport", "Mode", "SimilarityCache", "caption_key", "cluster_near_duplicates",
    "distinct_n", "diversity_report", "grounding", "near_unique_ratio", "normalize_caption",
    "repeat_probability", "self_bleu", "top_mode_share", "unique_ratio",
]
