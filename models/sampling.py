"""Rows with their own decoding options in one transformers ``generate`` call (the hf engine).

A server batch mixes requests: one greedy, one sampled at temperature 1.0 with seed 7, one at 0.7 with
top_k 20. transformers' ``generate`` takes one set of options per call and draws every sampled token of the
batch from torch's one global random stream, so a row's caption would depend on which other rows shared
its batch, and a seed could not reproduce it. Here each row decodes by its own options inside one greedy
call: ``RowSampler``, a logits processor, applies the row's repetition penalty, temperature, top-k and
top-p (transformers' own processors, per row, in transformers' order) and, for a sampled row, draws the
token from the row's own ``torch.Generator`` and leaves it the only finite logit, so the call's argmax
takes it. A row's draws depend only on its seed and its logits: same seed, same video -> same caption,
whatever else is in the batch (tested), and on one row it is token for token what transformers' own
sampling gives after ``torch.manual_seed(seed)`` (tested).

Beam search cannot be done per row (beams reorder the batch), so rows with ``num_beams > 1`` get a call of
their own per distinct option set (``plan_calls``). Rows that are plain greedy with no penalty are left
untouched: a batch of only those runs exactly the call capguard always made, with no processor.
Cost: a few vector ops over the vocabulary per processed row and step, in Python; nothing for plain rows.

``RepetitionStop`` is vLLM's ``repetition_detection`` for the hf engine: after each step, a row with
``stop_on_repetition`` whose last tokens are ``repetition_min_count`` copies of one pattern (of at least
``repetition_min_pattern_size`` tokens) gets EOS as its only finite logit, so it ends there, in greedy,
sampled and beam-search calls alike, and ``Captioner.finish`` cuts the EOS. vLLM checks the same tail after
the same token (the length limit first), so both engines keep the same tokens; ``finish_reason`` then tells
a repetition stop from an EOS or the limit. Written here rather than taken from vLLM: transformers has no
such stop, and capguard's hf engine must not need vLLM. Cost, only in calls with such a row: per step the
ids as a list, then per stopping row one comparison per candidate pattern size (up to tokens / count) and a
slice compare for the few that match their last token; measured 12 / 52 / 227 us per step for 16 rows at
8 / 48 / 200 tokens (a vocabulary of 152k: the logits are copied only on the step a row stops).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import astuple, replace

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from capguard.models.config import GenerationConfig


def _row_processors(gen: GenerationConfig) -> list:
    """transformers' processors for one row, in the order transformers applies them (penalty, then the
    sampling warpers), each only when it changes something (as transformers adds them)."""
    processors = []
    if gen.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(gen.repetition_penalty))
    if gen.do_sample:
        if gen.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(gen.temperature))
        if gen.top_k:
            processors.append(TopKLogitsWarper(gen.top_k))
        if gen.top_p < 1.0:
            processors.append(TopPLogitsWarper(gen.top_p))
    return processors


class RowSampler(LogitsProcessor):
    """Per-row decoding inside one greedy ``generate`` call (see the module docstring).

    gens: one GenerationConfig per row of the call, all with num_beams 1. A sampled row without a seed
    gets a fresh one (not reproducible: capguard.models.decoding always sets one for a request).
    """

    def __init__(self, gens: list[GenerationConfig]):
        self.rows = [(_row_processors(g), g.seed if g.seed is not None else secrets.randbits(63))
                     if g.do_sample else (_row_processors(g), None) for g in gens]
        self._generators: list[torch.Generator | None] | None = None   # made on the logits' device, first step

    @staticmethod
    def needed(gens: list[GenerationConfig]) -> bool:
        """Whether any row differs from plain greedy (no processor needed otherwise)."""
        return any(g.do_sample or g.repetition_penalty != 1.0 for g in gens)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        """(B, t) ids generated so far, (B, V) float32 logits -> (B, V) logits whose argmax is each row's token."""
        if self._generators is None:
            self._generators = [None if seed is None else torch.Generator(scores.device).manual_seed(seed)
                                for _, seed in self.rows]
        out = scores.clone()
        for i, ((processors, _), generator) in enumerate(zip(self.rows, self._generators, strict=True)):
            row = scores[i:i + 1]                                          # (1, V)
            for processor in processors:
                row = processor(input_ids[i:i + 1], row)
            if generator is not None:
                probs = torch.softmax(row, dim=-1)                         # (1, V)
                token = torch.multinomial(probs, num_samples=1, generator=generator)   # (1, 1)
                row = torch.full_like(row, -float("inf")).scatter_(1, token, 0.0)
            out[i:i + 1] = row
        return out


def repeating_tail(ids: Sequence[int], min_count: int, min_pattern_size: int) -> int:
    """Size of the shortest pattern (>= ``min_pattern_size`` tokens) that ends ``ids`` ``min_count`` times in a
    row; 0 when none does. What vLLM's repetition_detection tests after each token (max_pattern_size: any).

    Example: ids=[5, 1, 2, 3, 1, 2, 3], min_count=2, min_pattern_size=2 -> 3 ("1 2 3" twice at the end);
    the same ids with min_count=3 -> 0; [7, 7, 7, 7] with (2, 1) -> 1.
    """
    n = len(ids)
    for size in range(min_pattern_size, n // min_count + 1):
        if ids[n - 1 - size] != ids[n - 1]:     # cheap reject: the last token must recur one pattern back
            continue
        tail = list(ids[n - size:])
        if all(list(ids[n - (k + 1) * size:n - k * size]) == tail for k in range(1, min_count)):
            return size
    return 0


def finish_reason(gen: GenerationConfig, token_ids: Sequence[int], limit: int) -> str:
    """Why an hf row stopped: "length" (it reached ``limit``), "repetition" (``RepetitionStop`` ended it: its
    kept tokens end in a repeat, which no row outlives), or "stop" (the model's own EOS).

    The order is vLLM's: the limit is checked before the repeat. ``token_ids``: the kept ids, EOS cut.
    Example: 8 kept ids "1 2 3 4 1 2 3 4", limit 48, stop_on_repetition with (2, 4) -> "repetition".
    """
    if len(token_ids) >= limit:
        return "length"
    if gen.stop_on_repetition and repeating_tail(token_ids, gen.repetition_min_count,
                                                 gen.repetition_min_pattern_size):
        return "repetition"
    return "stop"


class RepetitionStop(LogitsProcessor):
    """Ends a row whose last tokens repeat (see the module docstring), after any other processor.

    gens: one GenerationConfig per row of the call, or one for every row (a beam-search call: its B * beams
    rows share one option set). eos_id: the token that ends a row (required: without it no row can end early).
    """

    def __init__(self, gens: list[GenerationConfig], eos_id: int | None):
        if eos_id is None:
            raise ValueError("stop_on_repetition needs the tokenizer's EOS token to end a row; this checkpoint's "
                             "tokenizer has none: leave stop_on_repetition out")
        self.rows = [(g.repetition_min_count, g.repetition_min_pattern_size) if g.stop_on_repetition else None
                     for g in gens]
        self.eos_id = eos_id

    @staticmethod
    def needed(gens: list[GenerationConfig]) -> bool:
        return any(g.stop_on_repetition for g in gens)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        """(B, t) ids generated so far, (B, V) logits -> the same, with EOS forced for rows that repeat."""
        if input_ids.shape[1] == 0:
            return scores
        rows = self.rows * input_ids.shape[0] if len(self.rows) == 1 else self.rows   # one set: every beam
        stop = [i for i, (row, ids) in enumerate(zip(rows, input_ids.tolist(), strict=True))   # a row with EOS
                if row is not None and self.eos_id not in ids and repeating_tail(ids, *row)]   # is done: padding
        if stop:
            scores = scores.clone()
            scores[stop] = -float("inf")
            scores[stop, self.eos_id] = 0.0
        return scores


def _call_options(gen: GenerationConfig) -> dict:
    """transformers ``generate`` keyword arguments of one row's options (max_new_tokens set by the caller)."""
    options = {"do_sample": gen.do_sample, "num_beams": gen.num_beams, "repetition_penalty": gen.repetition_penalty}
    if gen.do_sample:
        options |= {"temperature": gen.temperature, "top_p": gen.top_p, "top_k": gen.top_k or None}
    return options


def plan_calls(gens: list[GenerationConfig], eos_id: int | None = None) -> list[tuple[list[int], dict]]:
    """Split a batch's rows into ``generate`` calls: [(row indices, generate keyword arguments)].

    Rows with one beam share one call (with a RowSampler when any needs it, then a RepetitionStop when any
    stops on repetition: ``eos_id`` ends those rows); beam-search rows share a call only with rows of the
    same options. Example: [greedy, sampled seed 1, beams 3, greedy] ->
    [([0, 1, 3], {..., "logits_processor": [RowSampler]}), ([2], {"num_beams": 3, ...})].
    """
    single = [i for i, g in enumerate(gens) if g.num_beams == 1]
    calls = []
    if single:
        rows = [gens[i] for i in single]
        options = {"do_sample": False, "num_beams": 1, "repetition_penalty": 1.0}
        processors = [RowSampler(rows)] if RowSampler.needed(rows) else []
        if RepetitionStop.needed(rows):
            processors.append(RepetitionStop(rows, eos_id))
        if processors:
            options["logits_processor"] = LogitsProcessorList(processors)
        calls.append((single, options))
    beams: dict[tuple, list[int]] = {}
    for i, g in enumerate(gens):
        if g.num_beams > 1:   # same options (limits aside) share a call
            beams.setdefault(astuple(replace(g, max_new_tokens=0, seed=None)), []).append(i)
    for rows in beams.values():
        options = _call_options(gens[rows[0]])
        if gens[rows[0]].stop_on_repetition:   # every row and beam of the call has the same option set
            options["logits_processor"] = LogitsProcessorList([RepetitionStop([gens[rows[0]]], eos_id)])
        calls.append((rows, options))
    return calls


__all__ = ["RepetitionStop", "RowSampler", "finish_reason", "plan_calls", "repeating_tail"]
