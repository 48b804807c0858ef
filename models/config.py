"""The checkpoint manifest, ``capguard.json``: typed dataclasses and their (de)serialisation.

A checkpoint is a directory. Its ``capguard.json`` names every component by a path relative to
that directory, so training epochs that differ only in the projector share one encoder and one
LLM on disk (``"path": "../shared/llm"``). See checkpoints/README.md for the full format.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from capguard.models.rules import check_threshold_names

SCHEMA_VERSION = 1
MANIFEST_NAME = "capguard.json"
VIDEO_PLACEHOLDER = "<video>"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message says what is wrong and where."""


@dataclass
class VisionConfig:
    path: str                      # the tower's local dir, relative to the checkpoint
    select_layer: int = -2         # LLaVA default: the penultimate block's output keeps spatial detail
    select_feature: str = "patch"  # "patch" (drop CLS, LLaVA default) or "cls_patch"
    # "open_clip" (open_clip_config.json + weights; the default, so older manifests stay valid) or
    # "transformers" (CLIPVisionModel / SiglipVisionModel save_pretrained dir + preprocessor_config.json)
    type: str = "open_clip"


@dataclass
class ProjectorConfig:
    type: str                      # capguard.models.projector.PROJECTOR_TYPES: rebuilds the module, no guessing
    weights: str = "projector.safetensors"   # safetensors (or a LLaVA mm_projector.bin), relative path
    options: dict[str, Any] = field(default_factory=dict)  # c-abstractor: num_queries, num_heads, dropout


@dataclass
class LLMConfig:
    path: str                      # transformers model dir (config.json, weights, tokenizer), relative path
    dtype: str = "auto"            # "auto": bf16/fp16 on GPU, fp32 on CPU; or float32|bfloat16|float16


@dataclass
class GenerationConfig:
    max_new_tokens: int = 48       # captions are one sentence; bounds latency per request
    num_beams: int = 1             # greedy: deterministic, so a repeated caption means a repeated model output
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                 # 0: no top-k limit (sampling only); the same meaning in HF and vLLM
    repetition_penalty: float = 1.0
    seed: int | None = None        # sampling: the row's own random stream (capguard.models.decoding); None: fresh
    # end a row once its last tokens repeat (vLLM's repetition_detection; capguard.models.sampling on hf): a
    # caption looping to max_new_tokens costs the whole budget and says nothing more after its second copy
    stop_on_repetition: bool = False
    repetition_min_count: int = 2          # copies in a row that stop it (>= 2)
    # shortest pattern, in tokens, that counts: 8 with 2 copies is models/degenerate.py's "a phrase of >= 8
    # units said twice back to back"; shorter loops stop once a multiple of them reaches 8 tokens
    repetition_min_pattern_size: int = 8

    def __post_init__(self):
        if self.repetition_min_count < 2 or self.repetition_min_pattern_size < 1:
            raise ValueError(f"generation: repetition_min_count must be >= 2 and repetition_min_pattern_size >= 1, "
                             f"got {self.repetition_min_count} and {self.repetition_min_pattern_size}")


@dataclass
class ScorerConfig:
    path: str                      # open_clip local dir of a SigLIP/CLIP model used to score captions
    tokenizer: str | None = None   # HF tokenizer dir (tokenizer.json); None: the one open_clip names


@dataclass
class CheckpointConfig:
    vision: VisionConfig
    projector: ProjectorConfig
    llm: LLMConfig
    prompt: str = f"{VIDEO_PLACEHOLDER}\n"   # the visual tokens replace the placeholder
    num_frames: int = 8            # the field report's 8 frames per video
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    scorer: ScorerConfig | None = None
    name: str = ""                 # display name; the server uses the directory name
    info: dict[str, Any] = field(default_factory=dict)  # free-form provenance: training run, epoch, seed
    # Guard thresholds this checkpoint's caption style needs (e.g. templated captions, where one word is
    # one attribute, want a stricter near_dup_threshold); server settings set explicitly still win.
    guard: dict[str, float] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = MANIFEST_NAME) -> CheckpointConfig:
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise CheckpointError(f"{where}: schema_version {version!r} is not supported (expected {SCHEMA_VERSION})")
        sections = {"vision": VisionConfig, "projector": ProjectorConfig, "llm": LLMConfig,
                    "generation": GenerationConfig, "scorer": ScorerConfig}
        kwargs = _typed(cls, data, where, skip=set(sections))
        for key, typ in sections.items():
            value = data.get(key)
            if value is None:
                if key in ("vision", "projector", "llm"):
                    raise CheckpointError(f"{where}: missing required section {key!r}")
                continue
            if not isinstance(value, dict):
                raise CheckpointError(f"{where}: section {key!r} must be an object")
            known = _typed(typ, value, f"{where}:{key}")
            try:
                kwargs[key] = typ(**known)
            except ValueError as exc:   # a section's own check (GenerationConfig's repetition stop)
                raise CheckpointError(f"{where}: {exc}") from exc
        config = cls(**kwargs)
        if VIDEO_PLACEHOLDER not in config.prompt:
            raise CheckpointError(f"{where}: prompt must contain the {VIDEO_PLACEHOLDER} placeholder")
        try:
            check_threshold_names(config.guard)
        except ValueError as exc:
            raise CheckpointError(f"{where}: {exc}") from exc
        if config.vision.select_feature not in ("patch", "cls_patch"):
            raise CheckpointError(f"{where}: vision.select_feature must be 'patch' or 'cls_patch'")
        if config.vision.type not in ("open_clip", "transformers"):
            raise CheckpointError(f"{where}: vision.type must be 'open_clip' or 'transformers'")
        return config

    @classmethod
    def load(cls, directory: str | Path) -> CheckpointConfig:
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            raise CheckpointError(f"{directory} is not a capguard checkpoint: {MANIFEST_NAME} is missing")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: invalid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise CheckpointError(f"{path}: expected a JSON object")
        return cls.from_dict(data, str(path))

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path


def _typed(cls: type, data: dict[str, Any], where: str, skip: set[str] = frozenset()) -> dict[str, Any]:
    """Keep the keys the dataclass knows; unknown keys are an error (a typo must not be ignored)."""
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise CheckpointError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    return {k: v for k, v in data.items() if k not in skip}
