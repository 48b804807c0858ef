"""Loops inside one caption: the output that repeats a phrase or a sentence until ``max_new_tokens``.

The failure video-LLM users report most (issue 15, section 2): "도시의 풍경을 보여주는 영상입니다. 도시의 풍경을
보여주는 영상입니다. ..." or "a man is walking a man is walking a man is". A window-level guard misses it
when every video gets its own loop; it is a property of one caption, so it is judged per caption here.

``degeneration(caption, num_tokens, max_new_tokens)`` -> ``None`` or a ``Degeneration``:
- ``repeated_sentence``: the same sentence (after ``caption_key`` normalization) twice or more in a row;
- ``repeated_ngram``: a tandem repeat of a phrase (the caption is periodic over a span), counted in
  *units*: one unit per Hangul syllable (Korean spacing is unreliable, so words are not), one per other
  word (Latin, digits); a Latin word weighs 2 units in the thresholds (about a 2-syllable Korean word);
- ``token_limit``: no loop found, but generation stopped at ``max_new_tokens`` (the caption is cut; a
  loop that continued past the cut is often what filled the budget).
A loop that also hit the limit keeps its loop kind with ``hit_token_limit=True``.

Hand-written: no maintained library detects tandem repeats in captions (sacrebleu and rapidfuzz compare
two strings; this is one string against itself). Cost: one numpy comparison per candidate period (only
the distances between repeated unit bigrams), tens of microseconds for a demo caption
(bench/bench_guard.py --new-figures).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from capguard.models.diversity import caption_key, normalize_caption

# the ``kind`` values, for counters and tests. repetition_stop: the engine ended the row because its tokens
# repeated (the stop_on_repetition decoding option) and the text it left is too short for the detector below
KINDS = ("repeated_sentence", "repeated_ngram", "token_limit", "repetition_stop")
# The kinds that are loops: what the guard's degenerate_share counts. A caption merely cut at max_new_tokens
# is not one (a healthy captioner with a tight limit is cut often); it is still returned and counted per kind.
# A row stopped for repeating is one: else turning stop_on_repetition on would hide a looping checkpoint.
LOOP_KINDS = ("repeated_sentence", "repeated_ngram", "repetition_stop")

# Thresholds, in units (Hangul syllable = 1, other word = LATIN_WORD_UNITS); each with its reason.
# Three copies in a row covering >= 7 units: natural text does not ("반짝반짝" is 2 copies of 2, "하하하"
# 3 copies of 1, "very very very" 3 copies of one word = 6 units: the longest natural triple we know).
MIN_REPEATS = 3
MIN_SPAN_AT_MIN_REPEATS = 7
# Two copies of a long phrase in a row ("a man is walking a man is walking", "풍경을 보여주는 풍경을 보여주는"):
# a phrase of >= 8 units said twice back to back is a loop, not style (the longest natural doubling we know,
# "하나하나" / "구불구불", is 2 + 2 units).
MIN_PERIOD_AT_TWO_REPEATS = 8
# A repeated sentence must have this many units: "네. 네." is an answer, not a loop.
MIN_SENTENCE_UNITS = 4
LATIN_WORD_UNITS = 2

_UNIT = re.compile(r"[\uac00-\ud7a3]|[^\s\uac00-\ud7a3]+")   # a Hangul syllable, or a run of anything else
_SENTENCE_END = re.compile(r"(?<=[.!?。？！])(?!\d)\s*|\n+")   # "5.5층" is one number, not two sentences


@dataclass(frozen=True)
class Degeneration:
    """What is wrong with one caption; ``to_dict`` is what a response / caption log carries."""

    kind: str               # one of KINDS
    period: int             # units in one copy of the loop (sentences: units of the sentence); 0 for token_limit
    repeats: float          # copies in the run, a trailing partial copy counted as a fraction (2.75)
    coverage: float         # units inside the run / units in the caption, 0-1 (0 for token_limit)
    text: str               # one copy of the repeating phrase or sentence (normalized), "" for token_limit
    hit_token_limit: bool   # generation stopped at max_new_tokens

    def to_dict(self) -> dict:
        return asdict(self)


def units(text: str) -> list[str]:
    """The units loops are counted in: Hangul syllables one by one, other words whole (normalized text).

    Example: "도시의 풍경. A man is" -> ["도", "시", "의", "풍", "경", "a", "man", "is"].
    """
    return _UNIT.findall(normalize_caption(text))


def _weight(unit: str) -> int:
    return 1 if len(unit) == 1 and "\uac00" <= unit <= "\ud7a3" else LATIN_WORD_UNITS


def _candidate_periods(ids: np.ndarray) -> list[int]:
    """Periods worth testing: distances between two occurrences of one unit bigram, ascending.

    A stretch with >= 2 copies of period p >= 2 repeats each of its bigrams p apart (and p = 1 with >= 3
    copies repeats the bigram "aa" 1 apart), so no other period can hold a loop that counts. A normal
    caption repeats few bigrams, so this keeps the numpy scan to a handful of periods.
    Example: ids of a b c a b c a b -> [3, 6].
    """
    seen: dict[tuple[int, int], list[int]] = {}
    for j, bigram in enumerate(zip(ids[:-1].tolist(), ids[1:].tolist(), strict=True)):
        seen.setdefault(bigram, []).append(j)
    n = len(ids)
    return sorted({b - a for where in seen.values() if len(where) > 1
                   for i, a in enumerate(where) for b in where[i + 1:] if b - a <= n // 2})


def _longest_tandem(ids: np.ndarray) -> tuple[int, int, int]:
    """(period, start, span) of the longest periodic stretch of ``ids`` (N,) with >= 2 copies; ties -> shorter
    period. span counts every position of the stretch, the trailing partial copy included. (0, 0, 0): none.

    Example: ids of a b c a b c a b -> (3, 0, 8): "abc" 2 full copies + "ab".
    """
    best = (0, 0, 0)
    for p in _candidate_periods(ids):
        same = np.concatenate(([False], ids[:-p] == ids[p:], [False]))  # (n - p + 2,) position j matches j + p
        edges = np.flatnonzero(np.diff(same.astype(np.int8)))          # run starts and ends, alternating
        starts, ends = edges[0::2], edges[1::2]
        lengths = ends - starts                                        # matches in a row: span = run + p
        k = int(np.argmax(lengths))
        if lengths[k] >= p and lengths[k] + p > best[2]:               # >= 2 full copies
            best = (p, int(starts[k]), int(lengths[k]) + p)
    return best


def _sentence_loop(caption: str, total_units: int) -> Degeneration | None:
    """The longest run of one sentence repeated back to back (>= 2 copies), if any."""
    parts = [normalize_caption(part) for part in _SENTENCE_END.split(caption)]
    shown = [part for part in parts if part]                  # normalized, spaces kept: what the report shows
    sentences = [caption_key(part) for part in shown]         # compared spacing-free, like every other count
    best: tuple[int, int] | None = None   # (copies, index of the first copy)
    i = 0
    while i < len(sentences):
        j = i
        while j + 1 < len(sentences) and sentences[j + 1] == sentences[i]:
            j += 1
        if j > i and (best is None or j - i + 1 > best[0]):
            best = (j - i + 1, i)
        i = j + 1
    if best is None:
        return None
    copies, first = best
    sentence_units = units(shown[first])
    size = sum(map(_weight, sentence_units))
    if size < MIN_SENTENCE_UNITS:
        return None
    return Degeneration("repeated_sentence", size, float(copies), min(1.0, copies * size / max(total_units, 1)),
                        shown[first], False)


def degeneration(caption: str, num_tokens: int | None = None, max_new_tokens: int | None = None
                 ) -> Degeneration | None:
    """Is this caption a loop (or cut at the token limit)? None when it reads as a normal caption.

    num_tokens / max_new_tokens: the generated token count (EOS excluded) and the limit it ran under; both
    needed for ``token_limit``. Examples:
    "도시의 풍경을 보여주는 영상입니다. 도시의 풍경을 보여주는 영상입니다. 도시의" -> repeated_sentence,
    period 15, repeats 2.0; "a man is walking a man is walking a man is" -> repeated_ngram, period 8
    (4 words), repeats 2.75, coverage 1.0; "반짝반짝 빛나는 도시" -> None; ("도시", 48, 48) -> token_limit.
    """
    if not isinstance(caption, str):
        raise TypeError(f"caption must be str, got {type(caption).__name__}")
    hit = num_tokens is not None and max_new_tokens is not None and num_tokens >= max_new_tokens
    tokens = units(caption)
    weights = np.array([_weight(u) for u in tokens], dtype=np.int64)   # (N,)
    total = int(weights.sum())
    found = _sentence_loop(caption, total)
    if found is None and len(tokens) >= 2:
        vocab: dict[str, int] = {}
        ids = np.array([vocab.setdefault(u, len(vocab)) for u in tokens], dtype=np.int64)   # (N,)
        p, start, span = _longest_tandem(ids)
        if p:
            period = int(weights[start:start + p].sum())
            covered = int(weights[start:start + span].sum())
            repeats = span / p
            if (repeats >= MIN_REPEATS and covered >= MIN_SPAN_AT_MIN_REPEATS) or period >= MIN_PERIOD_AT_TWO_REPEATS:
                phrase = "".join(t if _weight(t) == 1 else f" {t} " for t in tokens[start:start + p])
                found = Degeneration("repeated_ngram", period, round(repeats, 3), covered / total,
                                     " ".join(phrase.split()), False)
    if found is not None:
        return Degeneration(**{**asdict(found), "hit_token_limit": hit})
    if hit:
        return Degeneration("token_limit", 0, 0.0, 0.0, "", True)
    return None


def degenerate_share(kinds: Sequence[str | None]) -> float:
    """Share of captions whose degeneration kind is a loop (``LOOP_KINDS``); n == 0 -> nan.

    Example: ["repeated_ngram", None, "token_limit", None] -> 1/4 = 0.25.
    """
    return sum(kind in LOOP_KINDS for kind in kinds) / len(kinds) if len(kinds) else float("nan")




def repetition_stop() -> Degeneration:
    """A row the engine stopped because its last tokens repeated, where the text left reads clean to
    ``degeneration`` (8 repeated tokens of a byte-level tokenizer can be 3 syllables)."""
    return Degeneration("repetition_stop", 0, 0.0, 0.0, "", False)


def judge(caption: str, num_tokens: int | None = None, max_new_tokens: int | None = None,
          finish_reason: str | None = None) -> Degeneration | None:
    """``degeneration`` of the text, else ``repetition_stop`` when the engine ended the row for repeating
    (finish_reason "repetition", the stop_on_repetition option): what the server counts and the guard sees."""
    found = degeneration(caption, num_tokens, max_new_tokens)
    return found if found is not None or finish_reason != "repetition" else repetition_stop()


__all__ = ["KINDS", "LOOP_KINDS", "Degeneration", "degenerate_share", "degeneration", "judge", "repetition_stop",
           "units"]
