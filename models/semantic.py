"""Near-duplicates that read Korean: content over form (Korean morphology) and meaning (scorer embeddings).

The near-duplicate clustering of ``capguard.models.diversity`` compares captions syllable by syllable, so
it weighs a particle or an ending (도시의 / 도시, 합니다 / 한다) as much as the word that carries the content,
and a stream of re-worded copies of one generic sentence looks varied (issue 15, section 3). Two figures
here tell content from form:

- ``content_key``: the caption's *content morphemes* (nouns, numbers, verb and adjective stems as lemmas,
  adverbs, foreign words) from kiwipiepy's analysis, sorted, so particles, endings, auxiliaries, spacing and
  word order do not count: "도시의 풍경을 보여주는 영상입니다" and "영상은 도시 풍경을 보여준다" share the key
  "도시 보이다 영상 풍경". ``content_unique_ratio`` = distinct keys / captions, the exact-unique ratio read
  on content. Synonyms (도시 / 도심, 담은 / 보여주는) are not one morpheme: that is the semantic figure's job.
- ``vendi_score``: the Vendi score (Friedman & Dieng, 2023) of the scorer's text embeddings, exp of the
  entropy of the eigenvalues of K = X X^T / n for unit rows X (n, d): the effective number of different
  captions *by meaning* (1 = all the same, n = all orthogonal). Dual form: K's non-zero eigenvalues are
  those of X^T X / n (d, d), so it costs O(n d^2) and ``RunningVendi`` keeps X^T X up to date in O(d^2)
  per caption. Its scale depends on the scorer (a scorer whose captions are all about buildings gives a
  healthy window of 100 a Vendi of ~9, bench/RESULTS.md), so it is reported, not a default rule.

Measured on the recorded val captions and crafted streams (bench/bench_semantic.py, bench/RESULTS.md):
content-unique reads 0.96-0.98 on the healthy demo (greedy or sampled) and 0.12 on 97 re-wordings of one
generic sentence, which syllable near-unique at 0.9 flags only narrowly (0.46); so ``content_unique_ratio``
< 0.5 joins the guard's rules, next to the syllable rule that still catches one-word swaps (풍경/광경).
Known limits of word-by-word analysis: an auxiliary written apart ("보여 주는") keeps 주다, and a word alone
is sometimes mis-split (선 as a noun); both are consistent from caption to caption, which is all an
identity needs. English captions get no morphology: their content key is their sorted words.

Cost (bench/bench_guard.py --new-figures): kiwipiepy analyses each distinct *word* (eojeol) once and caches it, so a
captioner's vocabulary is analysed once and a new caption costs dictionary look-ups; loading the analyser
costs ~10 s once per process (done on first use, or ahead by ``warm_up``).
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from collections.abc import Sequence

import numpy as np

from capguard.models.diversity import NAN, normalize_caption

logger = logging.getLogger(__name__)

# Kiwi (Sejong) tags whose morphemes carry content: general/proper/bound nouns, numerals, numbers, verb and
# adjective stems (regular and irregular), roots, general adverbs, foreign words, Chinese characters.
# Dropped: particles (J*), endings (E*), copula (VCP/VCN), affixes (X*), auxiliaries (VX), pronouns (NP),
# determiners (MM), conjunctive adverbs (MAJ), punctuation (S*): what varies between re-wordings.
CONTENT_TAGS = frozenset({"NNG", "NNP", "NNB", "NR", "SN", "VV", "VA", "VV-I", "VA-I", "VV-R", "VA-R", "XR",
                          "MAG", "SL", "SH"})
_PREDICATES = ("VV", "VA")   # stems that read as lemmas with 다: 보이 -> 보이다

_kiwi = None
_kiwi_lock = threading.Lock()


def _analyser():
    """The process's kiwipiepy analyser, loaded on first use (~10 s; its model ships as a PyPI package)."""
    global _kiwi
    with _kiwi_lock:
        if _kiwi is None:
            from kiwipiepy import Kiwi

            # no typo / multi-word dictionaries: captions are generated text, and they double the load time
            _kiwi = Kiwi(num_workers=-1, load_typo_dict=False, load_multi_dict=False)
            _kiwi.tokenize("도시의 풍경")   # the first call builds the model's caches (seconds)
            logger.info("kiwipiepy %s loaded for content morphemes", getattr(_kiwi, "model_type", ""))
        return _kiwi


def warm_up() -> None:
    """Load the analyser now (a server calls this at start-up, so no request pays the ~10 s)."""
    _analyser()


@functools.lru_cache(maxsize=2**16)
def _word_content(word: str) -> tuple[str, ...]:
    """Content morphemes of one eojeol (space-free word); cached: a captioner reuses a small vocabulary.

    Example: "풍경을" -> ("풍경",); "보여주는" -> ("보이다",); "영상입니다" -> ("영상",).
    """
    return tuple(t.form + "다" if t.tag.startswith(_PREDICATES) else t.form
                 for t in _analyser().tokenize(word) if t.tag in CONTENT_TAGS)


def content_morphemes(caption: str) -> list[str]:
    """The caption's content morphemes in order, analysed word by word (see ``_word_content``).

    Word by word rather than the whole sentence: the analysis of a word hardly depends on its neighbours for
    telling content from particles and endings, and it makes the cache hit on every word already seen.
    Example: "이 영상은 도심의 풍경을 담고 있다." -> ["영상", "도심", "풍경", "담다"].
    """
    return [m for word in normalize_caption(caption).split() for m in _word_content(word)]


@functools.lru_cache(maxsize=2**16)
def content_key(caption: str) -> str:
    """Sorted content morphemes joined by spaces: the identity ``content_unique_ratio`` counts.

    Example: "도시의 풍경을 보여주는 영상입니다" and "영상은 도시 풍경을 보여준다." -> "도시 보이다 영상 풍경".
    A caption with no content morpheme keeps its normalized text, so it is not merged with other empty ones.
    """
    morphemes = content_morphemes(caption)
    return " ".join(sorted(morphemes)) if morphemes else normalize_caption(caption)


def content_unique_ratio(captions: Sequence[str]) -> float:
    """Distinct content keys / captions: the exact-unique ratio with particles, endings and order ignored.

    n == 0 -> nan. Example: ["도시의 풍경입니다", "도시 풍경이다", "밤의 도로"] -> 2/3.
    """
    if isinstance(captions, str):
        raise TypeError("captions must be a sequence of str, got one str; wrap it in a list")
    return len({content_key(c) for c in captions}) / len(captions) if captions else NAN


# ---------------------------------------------------------------------------------------------------------
# Vendi score


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be (n, d), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("embeddings have nan/inf entries; check the scorer's output")
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _vendi_from_gram(gram: np.ndarray, n: int) -> float:
    """exp(entropy) of the eigenvalues of gram / n; gram = X^T X (d, d) of n unit rows. n == 0 -> nan."""
    if n == 0:
        return NAN
    eig = np.linalg.eigvalsh(gram / n)          # (d,) sum to 1 (trace of X^T X = n for unit rows)
    eig = eig[eig > 1e-12]
    eig = eig / eig.sum()                       # wash out the float drift of a running sum
    return float(math.exp(-(eig * np.log(eig)).sum()))


def vendi_score(embeddings: np.ndarray) -> float:
    """Vendi score of (n, d) embeddings under the cosine kernel, dual form (eigenvalues of X^T X / n).

    Rows are L2-normalized here. Equals exp(-sum_i l_i log l_i) over the eigenvalues l of K = X X^T / n
    (tested against that primal form). n == 0 -> nan.
    Example: 4 copies of one row -> 1.0; rows of eye(3) -> 3.0; [e1, e1, e2, e2] -> 2.0.
    """
    x = _unit(embeddings)                                  # (n, d)
    return _vendi_from_gram(x.T @ x, x.shape[0])           # (d, d): O(n d^2)


class RunningVendi:
    """Vendi score of a changing set of embeddings: X^T X kept as a running sum, O(d^2) per add or remove.

    Adds and removes are queued (O(d) each: the row is normalized and kept) and folded into the (d, d) sum as
    two matrix products when the score is asked, A^T A - R^T R for the k rows in and out since: one BLAS
    call instead of 2k Python-level outer products (~0.15 ms each for d = 128 on the loaded dev box). The
    eigen-decomposition of the sum runs only when ``score()`` is asked, so a window that scores
    every k captions pays O(d^3) once per k: ``SCORE_EVERY`` is the cadence we recommend for a live window
    (the eigenvalues of a 128-dim sum cost about as much as the rest of the guard's work on one caption, and
    a window of 100 changes its Vendi score by ~1 % per caption, so a figure 10 captions old says the same).
    Rows are normalized on the way in; remove a row with the same array that was added. ``reset(rows)``
    rebuilds the sum from scratch (a guard does so on each window turnover, to bound float drift).
    """

    SCORE_EVERY = 10
    FLUSH_ROWS = 256   # queued rows folded in without a score, so a long run of adds (a restore) stays small

    def __init__(self, dim: int):
        self.dim = dim
        self.n = 0
        self._gram = np.zeros((dim, dim))                  # (d, d) sum of x x^T over the rows held, flushed
        self._added: list[np.ndarray] = []                 # unit rows (d,) in since the last flush
        self._removed: list[np.ndarray] = []               # unit rows (d,) out since the last flush

    def _row(self, x: np.ndarray) -> np.ndarray:
        row = np.asarray(x, dtype=np.float64).ravel()     # (d,)
        if row.shape[0] != self.dim:
            raise ValueError(f"embedding of size {row.shape[0]} in a RunningVendi of dim {self.dim}")
        norm = math.sqrt(float(row @ row))
        if not math.isfinite(norm):
            raise ValueError("embedding has nan/inf entries; check the scorer's output")
        return row / max(norm, 1e-12)

    def add(self, x: np.ndarray) -> None:
        self._added.append(self._row(x))
        self.n += 1
        self._maybe_flush()

    def remove(self, x: np.ndarray) -> None:
        if self.n == 0:
            raise ValueError("RunningVendi.remove on an empty set")
        self._removed.append(self._row(x))
        self.n -= 1
        self._maybe_flush()

    def replace(self, old: np.ndarray, new: np.ndarray) -> None:
        """remove(old) + add(new): what a full rolling window does per caption."""
        self._removed.append(self._row(old))
        self._added.append(self._row(new))
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        if len(self._added) + len(self._removed) >= self.FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        """Fold the queued rows into the sum: gram += A^T A - R^T R, A (k_in, d), R (k_out, d).

        The sum's float rounding depends on where flushes fall: a caller that must reproduce a figure bit for
        bit (the guard's restore) flushes at the same points as the run it reproduces.
        """
        if self._added:
            a = np.stack(self._added)                  # (k_in, d)
            self._gram += a.T @ a
        if self._removed:
            r = np.stack(self._removed)                # (k_out, d)
            self._gram -= r.T @ r
        self._added, self._removed = [], []

    def reset(self, rows: np.ndarray | None = None) -> None:
        self._added, self._removed = [], []
        if rows is None or len(rows) == 0:
            self._gram, self.n = np.zeros((self.dim, self.dim)), 0
            return
        x = _unit(rows)
        self._gram, self.n = x.T @ x, x.shape[0]

    def score(self) -> float:
        self.flush()
        return _vendi_from_gram(self._gram, self.n)


__all__ = ["CONTENT_TAGS", "RunningVendi", "content_key", "content_morphemes", "content_unique_ratio",
           "vendi_score", "warm_up"]
