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
"""

from __future__ import annotations

import secrets
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


def _call_options(gen: GenerationConfig) -> dict:
    """transformers ``generate`` keyword arguments of one row's options (max_new_tokens set by the caller)."""
    options = {"do_sample": gen.do_sample, "num_beams": gen.num_beams, "repetition_penalty": gen.repetition_penalty}
    if gen.do_sample:
        options |= {"temperature": gen.temperature, "top_p": gen.top_p, "top_k": gen.top_k or None}
    return options


def plan_calls(gens: list[GenerationConfig]) -> list[tuple[list[int], dict]]:
    """Split a batch's rows into ``generate`` calls: [(row indices, generate keyword arguments)].

    Rows with one beam share one call (with a RowSampler when any needs it); beam-search rows share a call
    only with rows of the same options. Example: [greedy, sampled seed 1, beams 3, greedy] ->
    [([0, 1, 3], {..., "logits_processor": RowSampler}), ([2], {"num_beams": 3, ...})].
    """
    single = [i for i, g in enumerate(gens) if g.num_beams == 1]
    calls = []
    if single:
        rows = [gens[i] for i in single]
        options = {"do_sample": False, "num_beams": 1, "repetition_penalty": 1.0}
        if RowSampler.needed(rows):
            options["logits_processor"] = LogitsProcessorList([RowSampler(rows)])
        calls.append((single, options))
    beams: dict[tuple, list[int]] = {}
    for i, g in enumerate(gens):
        if g.num_beams > 1:   # same options (limits aside) share a call
            beams.setdefault(astuple(replace(g, max_new_tokens=0, seed=None)), []).append(i)
    calls += [(rows, _call_options(gens[rows[0]])) for rows in beams.values()]
    return calls


__all__ = ["RowSampler", "plan_calls"]
