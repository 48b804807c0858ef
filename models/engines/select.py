"""Choosing and building an engine: ``CAPGUARD_ENGINE=auto|hf|vllm`` (or ``--engine``), resolved once per LLM.

``auto`` takes vllm when it is installed and supports the LLM's architecture (``architectures`` in the
LLM directory's config.json, checked against vLLM's model registry), else hf; the choice and its reason
are logged once per (request, architecture).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

import torch

from capguard.models.captioner import Captioner
from capguard.models.engines.base import Engine, EngineError

log = logging.getLogger(__name__)

ENGINE_NAMES = ("auto", "hf", "vllm")
_logged: set[tuple[str, str, str]] = set()


def requested_engine(name: str | None = None) -> str:
    """The engine asked for: ``name`` when given, else ``CAPGUARD_ENGINE``, else "auto"; validated."""
    name = (name or os.environ.get("CAPGUARD_ENGINE") or "auto").strip().lower()
    if name not in ENGINE_NAMES:
        raise EngineError(f"unknown engine {name!r}; use one of {', '.join(ENGINE_NAMES)} (CAPGUARD_ENGINE, --engine)")
    return name


def vllm_support(llm_dir: Path) -> tuple[bool, str]:
    """(True, arch) when vLLM is importable and its registry knows the LLM's architecture, else (False, why)."""
    if importlib.util.find_spec("vllm") is None:
        return False, "vllm is not installed (make install-vllm)"
    try:
        archs = json.loads((Path(llm_dir) / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError) as exc:
        return False, f"cannot read {llm_dir}/config.json: {exc}"
    from capguard.models.engines.vllm_engine import quiet_vllm

    quiet_vllm()
    try:
        from vllm import ModelRegistry

        supported = set(ModelRegistry.get_supported_archs())
    except Exception as exc:  # noqa: BLE001 - a vllm that does not import (torch mismatch) means hf
        return False, f"vllm does not import: {type(exc).__name__}: {exc}"
    known = [a for a in archs if a in supported]
    if not known:
        return False, f"vLLM does not support the architecture {archs or '(none in config.json)'}"
    return True, known[0]


def resolve_engine(name: str | None, llm_dir: Path) -> str:
    """"hf" or "vllm" for this LLM. An explicit "vllm" that cannot run is an error, not a silent hf."""
    name = requested_engine(name)
    if name == "hf":
        return "hf"
    ok, detail = vllm_support(llm_dir)
    if name == "vllm" and not ok:
        raise EngineError(f"engine vllm cannot run {llm_dir}: {detail}")
    chosen = "vllm" if ok else "hf"
    key = (name, chosen, detail)
    if key not in _logged:
        _logged.add(key)
        log.info("engine %s (asked: %s; %s)", chosen, name, f"architecture {detail}" if ok else detail)
    return chosen


def build_engine(name: str | None, captioner: Captioner, llm_dir: Path, dtype: torch.dtype,
                 shared: dict | None = None, key: tuple = ()) -> Engine:
    """The engine for one loaded captioner. A vllm engine needs a VLLMCore (its engine-core process, ~11 s to
    start on CPU): taken from ``shared[key]`` when there (checkpoints sharing an LLM share it), else
    started and stored there; ComponentCache passes its LLM store, so evicting the LLM ends the core."""
    chosen = resolve_engine(name, llm_dir)
    if chosen == "hf":
        from capguard.models.engines.hf import HFEngine

        return HFEngine(captioner)
    from capguard.models.engines.vllm_engine import VLLMCore, VLLMEngine, VLLMOptions

    shared = {} if shared is None else shared
    core = shared.get(key)
    if core is None or not core.alive:
        core = shared[key] = VLLMCore(llm_dir, dtype, VLLMOptions.from_env())
    return VLLMEngine(captioner, core)
