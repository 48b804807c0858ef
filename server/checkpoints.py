"""The checkpoint registry: which directories may be served, loading them, and which one is active.

    checkpoints = Checkpoints(Path("checkpoints"), default="demo", device="cpu", on_load=restore_guard)
    stack = await checkpoints.get("runs/epoch-3")    # loads on first use, on the one loader thread
    await checkpoints.activate("demo")               # requests that name no checkpoint get this one

Loads run on one loader thread and share a ComponentCache, so epochs of one run share their encoder
and LLM. Checkpoint names are paths under checkpoints_root ("demo", "runs/epoch-3"): 1-2 components of
[A-Za-z0-9._-], none starting with a dot, resolving (symlinks followed) inside the root, with a
capguard.json. Anything else is 404, so a name can never reach outside the root.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from capguard.models.config import MANIFEST_NAME, CheckpointError
from capguard.models.engines import EngineError
from capguard.models.stack import CaptionStack, ComponentCache, compile_llm, load_stack
from capguard.server.errors import ApiError

log = logging.getLogger(__name__)

CHECKPOINT_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}(/[A-Za-z0-9_-][A-Za-z0-9._-]{0,99})?")


class Checkpoints:
    def __init__(self, root: Path, default: str, device: str,
                 on_load: Callable[[str, CaptionStack], None] = lambda name, stack: None, compile: bool = False,
                 engine: str = "auto"):
        self.root = Path(root).resolve()
        self.default = default
        self.active = default
        self.history = [default]          # activations, oldest first: where collapse_policy=fallback looks
        self.device = device
        self.on_load = on_load            # runs on the loader thread after a load (guard restore, gauges)
        self.compile = compile            # capguard.models.stack.compile_llm on each load (settings.compile)
        self.engine = engine              # auto | hf | vllm (settings.engine): resolved per LLM at load
        self.cache = ComponentCache()
        self._stacks: dict[str, CaptionStack] = {}
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="capguard-load")

    def path(self, name: str) -> Path:
        """The directory of checkpoint `name`; ApiError 404 for anything that is not a servable checkpoint."""
        if CHECKPOINT_NAME.fullmatch(name):
            path = (self.root / name).resolve()
            if path.is_relative_to(self.root) and (path / MANIFEST_NAME).is_file():
                return path
        raise ApiError(404, "unknown_checkpoint", f"no checkpoint named {name!r}; GET /checkpoints lists them")

    def names(self) -> list[str]:
        """Servable checkpoint names, sorted: dirs with a capguard.json one or two levels under the root."""
        found = [*self.root.glob(f"*/{MANIFEST_NAME}"), *self.root.glob(f"*/*/{MANIFEST_NAME}")]
        names = set()
        for manifest in found:
            name = manifest.parent.relative_to(self.root).as_posix()
            try:
                self.path(name)
            except ApiError:
                continue   # hidden dirs, odd characters, symlinks out of the root
            names.add(name)
        return sorted(names | set(self._stacks))

    def loaded(self, name: str) -> CaptionStack | None:
        return self._stacks.get(name)

    def load_blocking(self, name: str) -> CaptionStack:
        """Load `name` unless loaded (call on the loader thread). ApiError 404 / 422 (broken checkpoint)."""
        if name in self._stacks:
            return self._stacks[name]
        path = self.path(name)
        try:
            stack = load_stack(path, device=self.device, cache=self.cache, name=name, engine=self.engine)
            if self.compile:
                compile_llm(stack)
        except (CheckpointError, EngineError, OSError) as exc:
            log.error("checkpoint %s failed to load: %s", name, exc)
            raise ApiError(422, "checkpoint_error", f"checkpoint {name!r} cannot be loaded: {exc}") from exc
        self.on_load(name, stack)
        self._stacks[name] = stack
        return stack

    async def get(self, name: str) -> CaptionStack:
        """The loaded stack of `name`, loading it on first use (requests for it wait for the one load)."""
        stack = self._stacks.get(name)
        if stack is not None:
            return stack
        self.path(name)   # 404 at once, without queueing behind a load
        return await asyncio.get_running_loop().run_in_executor(self._loader, self.load_blocking, name)

    async def activate(self, name: str) -> CaptionStack:
        stack = await self.get(name)
        if name != self.active:
            log.info("active checkpoint: %s -> %s", self.active, name)
            self.active = name
            self.history = [n for n in self.history if n != name] + [name]
        return stack

    def drop_dead_engines(self) -> list[str]:
        """Forget the loaded checkpoints whose engine has died (a killed vLLM engine core), so the next request
        reloads them: the load reuses the cached encoder and LLM and starts a new engine (build_engine replaces
        a dead core), as a crashed decoder is replaced. Returns the names dropped."""
        dropped = []
        for name, stack in list(self._stacks.items()):
            if stack.engine is None:
                continue
            try:
                stack.engine.check_health()
            except EngineError as exc:
                log.error("checkpoint %s: its %s engine died (%s); it reloads on the next request", name,
                          stack.engine.name, exc)
                del self._stacks[name]
                dropped.append(name)
        return dropped

    def close(self) -> None:
        """Stop loading; close every engine, and the engine processes the component cache keeps (a vllm engine
        core is a child process: it must not outlive the server)."""
        self._loader.shutdown(wait=False, cancel_futures=True)
        for stack in self._stacks.values():
            if stack.engine is not None:
                stack.engine.close()
        for key, value in list(self.cache.llms.items()):
            if callable(getattr(value, "close", None)):   # a VLLMCore (LLM entries are (model, tokenizer) tuples)
                value.close()
                del self.cache.llms[key]
