"""Captioner: encoder -> projector -> causal LLM, with the visual tokens spliced into the prompt.

The prompt is split once at the ``<video>`` placeholder and tokenized once; per batch only the
visual tokens change. Sequences of different lengths (different frame counts) are left-padded
so generation continues from aligned last positions. The same ``build_inputs`` serves training
(with labels on the caption tokens only) and generation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn

from capguard.models.config import VIDEO_PLACEHOLDER, GenerationConfig
from capguard.models.encoder import VisionEncoder
from capguard.models.sampling import finish_reason, plan_calls

IGNORE_INDEX = -100


@functools.cache
def static_cache_options() -> dict:
    """generate options for a compiled LLM (capguard.models.stack.compile_llm): a fixed-size KV cache, and no compile
    of transformers' own on top of ours (it compiles by itself on a GPU when the cache is static)."""
    from transformers import GenerationConfig as HFGenerationConfig

    options = {"cache_implementation": "static"}
    if hasattr(HFGenerationConfig(), "disable_compile"):   # transformers >= 4.51
        options["disable_compile"] = True
    return options


@dataclass
class Generated:
    text: str
    token_ids: list[int]   # generated ids, EOS excluded
    # "stop" (EOS), "length" (max_new_tokens), "repetition" (stop_on_repetition ended it); None: not reported
    finish_reason: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class Captioner(nn.Module):
    def __init__(self, encoder: VisionEncoder, projector: nn.Module, llm: nn.Module, tokenizer, prompt: str):
        super().__init__()
        self.encoder, self.projector, self.llm, self.tokenizer = encoder, projector, llm, tokenizer
        before, after = prompt.split(VIDEO_PLACEHOLDER, 1)
        # BOS (if the tokenizer adds one) goes before the prompt's first part only.
        prefix = tokenizer(before, add_special_tokens=True)["input_ids"] if before else []
        if not before and tokenizer.bos_token_id is not None:
            prefix = [tokenizer.bos_token_id]
        suffix = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
        self.register_buffer("prefix_ids", torch.tensor(prefix, dtype=torch.long), persistent=False)
        self.register_buffer("suffix_ids", torch.tensor(suffix, dtype=torch.long), persistent=False)
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self._prompt_cache: tuple[tuple, torch.Tensor, torch.Tensor] | None = None   # see prompt_embeddings
        # generate with a fixed-size KV cache: what a compiled LLM forward needs (capguard.models.stack.compile_llm)
        self.static_cache = False

    @property
    def device(self) -> torch.device:
        return self.prefix_ids.device

    def visual_tokens(self, pixels: torch.Tensor, frames_per_video: list[int],
                      pooled: bool = False):
        """(sum T, 3, S, S) pixels -> list of (T_i*N, D_vision) token blocks (+ pooled (sum T, E))."""
        out = self.encoder(pixels, pooled=pooled)
        tokens, image_emb = out if pooled else (out, None)              # (sum T, N, D)
        blocks = [b.reshape(-1, b.shape[-1]) for b in torch.split(tokens, frames_per_video)]
        return (blocks, image_emb) if pooled else blocks

    def project(self, blocks: list[torch.Tensor]) -> list[torch.Tensor]:
        """Vision token blocks (L_i, D_vision) -> LLM token blocks (Q_i, D_llm); one call when shapes agree."""
        if len({b.shape[0] for b in blocks}) == 1:
            return list(self.projector(torch.stack(blocks)).unbind(0))  # (B, Q, D_llm)
        return [self.projector(b.unsqueeze(0))[0] for b in blocks]

    def prompt_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, D) and (S, D) embeddings of the prompt before and after ``<video>``.

        Without autograd (generation) they are computed once and reused for as long as the embedding
        table is the same tensor at the same version (an optimizer step bumps the version); with
        autograd (training) they are computed afresh so gradients reach the table.
        """
        embed = self.llm.get_input_embeddings()
        if torch.is_grad_enabled():
            return embed(self.prefix_ids), embed(self.suffix_ids)
        weight = embed.weight
        try:
            key = (weight.data_ptr(), weight._version, weight.dtype, weight.device, self.prefix_ids.device)
        except RuntimeError:  # an inference-mode tensor has no version counter: nothing to key the cache on
            return embed(self.prefix_ids), embed(self.suffix_ids)
        if self._prompt_cache is None or self._prompt_cache[0] != key:
            self._prompt_cache = (key, embed(self.prefix_ids), embed(self.suffix_ids))
        return self._prompt_cache[1], self._prompt_cache[2]

    def build_inputs(self, visual: list[torch.Tensor], targets: list[list[int]] | None = None):
        """Left-padded (B, L, D_llm) embeddings, (B, L) mask, (B, L) position ids and labels (or None).

        Each row is [prompt before <video>] [visual tokens] [prompt after] [target ids + EOS].
        """
        embed = self.llm.get_input_embeddings()
        dtype = embed.weight.dtype
        pre, suf = self.prompt_embeddings()                             # (P, D), (S, D)
        rows, label_rows = [], []
        for i, vis in enumerate(visual):
            parts = [pre, vis.to(dtype), suf]
            labels = [IGNORE_INDEX] * (pre.shape[0] + vis.shape[0] + suf.shape[0])
            if targets is not None:
                ids = list(targets[i]) + [self.eos_id]
                parts.append(embed(torch.tensor(ids, device=self.device)))
                labels += ids
            rows.append(torch.cat(parts))
            label_rows.append(labels)
        length = max(r.shape[0] for r in rows)
        batch, dim = len(rows), rows[0].shape[1]
        embeds = rows[0].new_zeros(batch, length, dim)
        mask = torch.zeros(batch, length, dtype=torch.long, device=self.device)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long, device=self.device)
        for i, row in enumerate(rows):
            n = row.shape[0]
            embeds[i, length - n:] = row
            mask[i, length - n:] = 1
            labels[i, length - n:] = torch.tensor(label_rows[i], device=self.device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        return embeds, mask, positions, (labels if targets is not None else None)

    def loss(self, visual: list[torch.Tensor], targets: list[list[int]]) -> torch.Tensor:
        embeds, mask, positions, labels = self.build_inputs(visual, targets)
        return self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, labels=labels).loss

    def sequence(self, visual: torch.Tensor) -> torch.Tensor:
        """One prompt for an engine that takes embeddings: (Q, D_llm) visual tokens -> (P + Q + S, D_llm)
        = [prompt before <video> | visual tokens | prompt after], in the LLM's dtype (no padding)."""
        pre, suf = self.prompt_embeddings()                             # (P, D), (S, D)
        return torch.cat([pre, visual.to(pre.dtype), suf])

    def finish(self, ids: list[int], limit: int, gen: GenerationConfig | None = None,
               reason: str | None = None) -> Generated:
        """Generated ids (possibly past EOS or past this row's limit) -> the caption: cut at ``limit`` and
        at the first EOS, decoded without special tokens. Every engine ends its rows here, so the same
        ids give the same text whichever engine made them. ``reason``: the engine's own finish reason
        (vLLM reports it); else, with the row's ``gen``, capguard.models.sampling.finish_reason."""
        kept = []
        for tok in ids[:limit]:
            if tok == self.eos_id:
                break
            kept.append(tok)
        if reason is None and gen is not None:
            reason = finish_reason(gen, kept, limit)
        return Generated(text=self.tokenizer.decode(kept, skip_special_tokens=True).strip(), token_ids=kept,
                         finish_reason=reason)

    def generate_options(self, gen: GenerationConfig, max_new_tokens: int) -> dict:
        """HF ``generate`` keyword arguments for one row (capguard.models.sampling: a sampled row draws from its
        own seeded stream, so the hf engine's one-by-one path reproduces a seed as the batched one does)."""
        [(_, options)] = plan_calls([gen], self.eos_id)
        options = options | {"max_new_tokens": max_new_tokens}
        if self.static_cache:
            options.update(static_cache_options())
        return options

    @torch.inference_mode()
    def generate(self, visual: list[torch.Tensor], gen: GenerationConfig | list[GenerationConfig],
                 max_new_tokens: list[int] | None = None, **extra) -> list[Generated]:
        """Batched decoding; each row may stop at its own ``max_new_tokens`` and decode by its own options.

        ``gen``: one GenerationConfig for every row, or one per row (a server batch mixes requests);
        ``capguard.models.sampling.plan_calls`` puts the rows in as few ``generate`` calls as it can (one,
        unless some rows use beam search), each sampled row on its own seeded random stream. Rows of a
        call run to its largest limit; a row cut at its own limit equals what a call with that limit
        would have produced (greedy, and sampled: a row's draws do not depend on the others). ``extra``
        goes to HF ``generate`` (the hf engine passes a stopping criterion that aborts a request).
        """
        gens = gen if isinstance(gen, list) else [gen] * len(visual)
        limits = max_new_tokens or [g.max_new_tokens for g in gens]
        results: list[Generated | None] = [None] * len(visual)
        for rows, options in plan_calls(gens, self.eos_id):
            embeds, mask, _, _ = self.build_inputs([visual[i] for i in rows])
            options = options | {"max_new_tokens": max(limits[i] for i in rows)}
            if self.static_cache:
                options.update(static_cache_options())
            out = self.llm.generate(inputs_embeds=embeds, attention_mask=mask, pad_token_id=self.pad_id,
                                    eos_token_id=self.eos_id, **options, **extra)   # (b, new) new tokens only
            for i, row in zip(rows, out.tolist(), strict=True):
                results[i] = self.finish(row, limits[i], gens[i])
        return results
