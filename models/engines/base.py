"""The engine boundary: what the caption pipeline asks of an LLM engine, and nothing about how it batches.

Read like vLLM's ``EngineClient``: a request is one prompt of embeddings, (L, D_llm) = [prompt prefix |
projected video tokens | prompt suffix] (``Captioner.sequence``), that enters the engine as soon as its
visual tokens are ready (``generate_one``) and leaves as soon as it is finished, or is aborted
(``abort``; a cancelled ``generate_one`` aborts its own request). ``generate`` is the synchronous batch
helper the CLI, the evaluations and ``CaptionStack.caption`` use. The encoder, projector and scorer stay
in capguard: an engine only turns embeddings into token ids, and ``Captioner.finish`` turns those into
the caption, so both engines cut and decode the same way.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from capguard.models.captioner import Generated
from capguard.models.config import GenerationConfig


class EngineError(RuntimeError):
    """An engine that cannot start, cannot take a model or a request, or has died; the message says which."""


@runtime_checkable
class Engine(Protocol):
    name: str   # "hf" | "vllm": logged, and the `engine` a server reports
    # True: the server sends each request through generate_one as soon as its visual tokens are ready
    # (continuous batching inside the engine); False: whole batches through generate (static batches)
    continuous: bool
    version: str   # the engine library's version (transformers, vllm): capguard_engine_info

    def generate(self, visual: list[torch.Tensor], gen: GenerationConfig | list[GenerationConfig],
                 max_new_tokens: list[int] | None = None) -> list[Generated]:
        """Caption a batch of (Q_i, D_llm) visual token blocks; blocks until every row is done. ``gen``: one
        GenerationConfig for all rows or one per row (a server batch mixes requests' decoding options)."""
        ...

    async def generate_one(self, embeds: torch.Tensor, gen: GenerationConfig, request_id: str,
                           max_new_tokens: int | None = None) -> Generated:
        """One (L, D_llm) prompt; returns when this request is finished, whatever else is running."""
        ...

    async def abort(self, request_id: str) -> None:
        """Stop a request in flight (no-op when it is unknown or already finished)."""
        ...

    def refuse(self, gen: GenerationConfig) -> str | None:
        """Why this engine cannot decode ``gen`` (a request's fault: the server answers 422 with it), or None.
        Asked before a request is queued, so a refusal never reaches the engine as a failure."""
        ...

    def check_health(self) -> None:
        """Raise EngineError when the engine can no longer serve (a dead engine process)."""
        ...

    def close(self) -> None:
        """Release the engine's processes and memory; idempotent."""
        ...
