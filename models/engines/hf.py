"""The ``hf`` engine: transformers ``generate`` in the calling process (what capguard always did).

Batches are static: ``generate`` runs every row to the batch's longest, and a finished row cannot
leave early. ``generate_one`` runs one prompt at a time in a worker thread (one lock: concurrent
requests queue for the model instead of each taking a share of the CPU); ``abort`` stops it at its
next decoding step through a stopping criterion, so a disconnected client frees the model within one
token. ``generate`` (whole batches) takes no lock, as before the engine boundary.
"""

from __future__ import annotations

import asyncio
import threading

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from capguard.models.captioner import Captioner, Generated
from capguard.models.config import GenerationConfig
from capguard.models.engines.base import EngineError


class _Aborted(StoppingCriteria):
    """Stops the whole (one-row) generation once its request id is in the engine's aborted set."""

    def __init__(self, aborted: set[str], request_id: str):
        self.aborted, self.request_id = aborted, request_id

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        stop = self.request_id in self.aborted
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class HFEngine:
    name = "hf"
    continuous = False   # static batches are what HF generate does best: the server batches them itself

    def __init__(self, captioner: Captioner):
        self.captioner = captioner
        self._lock = threading.Lock()
        self._pending: set[str] = set()    # ids of generate_one calls not yet returned
        self._aborted: set[str] = set()    # the subset to stop (only pending ids: nothing accumulates)
        self._closed = False

    def refuse(self, gen: GenerationConfig) -> str | None:
        if gen.stop_on_repetition and self.captioner.eos_id is None:   # RepetitionStop ends a row with EOS
            return ("stop_on_repetition ends a row with the tokenizer's EOS token and this checkpoint's tokenizer "
                    "has none; leave it out")
        return None

    def generate(self, visual: list[torch.Tensor], gen: GenerationConfig | list[GenerationConfig],
                 max_new_tokens: list[int] | None = None) -> list[Generated]:
        self.check_health()   # no lock: batches may run side by side (the server's CAPGUARD_MODEL_THREADS)
        return self.captioner.generate(visual, gen, max_new_tokens)

    async def generate_one(self, embeds: torch.Tensor, gen: GenerationConfig, request_id: str,
                           max_new_tokens: int | None = None) -> Generated:
        self.check_health()
        if request_id in self._pending:
            raise EngineError(f"request id {request_id!r} is already running")
        limit = max_new_tokens or gen.max_new_tokens
        self._pending.add(request_id)
        try:
            return await asyncio.to_thread(self._one, embeds, gen, request_id, limit)
        except asyncio.CancelledError:
            if request_id in self._pending:   # still running: it stops at its next step and forgets the id
                self._aborted.add(request_id)
            raise

    @torch.inference_mode()
    def _one(self, embeds: torch.Tensor, gen: GenerationConfig, request_id: str, limit: int) -> Generated:
        cap = self.captioner
        try:
            with self._lock:
                if request_id in self._aborted:
                    raise asyncio.CancelledError(f"request {request_id} was aborted")
                mask = torch.ones(1, embeds.shape[0], dtype=torch.long, device=cap.device)   # (1, L)
                out = cap.llm.generate(inputs_embeds=embeds.to(cap.device)[None], attention_mask=mask,
                                       pad_token_id=cap.pad_id, eos_token_id=cap.eos_id,
                                       stopping_criteria=StoppingCriteriaList([_Aborted(self._aborted, request_id)]),
                                       **cap.generate_options(gen, limit))   # (1, new)
                if request_id in self._aborted:
                    raise asyncio.CancelledError(f"request {request_id} was aborted")
        finally:
            self._pending.discard(request_id)
            self._aborted.discard(request_id)
        return cap.finish(out[0].tolist(), limit, gen)

    async def abort(self, request_id: str) -> None:
        if request_id in self._pending:
            self._aborted.add(request_id)

    @property
    def version(self) -> str:
        import transformers

        return transformers.__version__

    def check_health(self) -> None:
        if self._closed:
            raise EngineError("the hf engine is closed")

    def close(self) -> None:
        self._closed = True
