"""The LLM step behind one small interface: ``hf`` (transformers ``generate``) and ``vllm`` (vLLM's AsyncLLM)."""

from capguard.models.engines.base import Engine, EngineError
from capguard.models.engines.select import ENGINE_NAMES, build_engine, resolve_engine

__all__ = ["ENGINE_NAMES", "Engine", "EngineError", "build_engine", "resolve_engine"]
