"""Build small components from scratch and write them in the formats the loader reads.

Used by ``capguard init-checkpoint`` (a random-init stack for tests and for wiring up your own
parts) and by ``capguard train`` (the demo stack). Every writer here produces exactly what a
user's own components look like on disk: an open_clip local dir, a transformers model dir, a
projector safetensors file and a capguard.json.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn as nn

from capguard.models.config import (
    CheckpointConfig,
    GenerationConfig,
    LLMConfig,
    ProjectorConfig,
    ScorerConfig,
    VisionConfig,
)
from capguard.models.encoder import OPEN_CLIP_CONFIG, create_open_clip
from capguard.models.projector import build_projector
from capguard.models.weights import save_state_dict

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
# A few sentences in both languages so a random-init tokenizer covers Hangul and Latin text.
BOOTSTRAP_TEXT = [
    "맑은 낮, 평평한 지붕의 3층짜리 회색 건물을 왼쪽으로 패닝하며 촬영한 영상",
    "해질녘, 기와지붕을 얹은 2층짜리 갈색 한옥을 오른쪽으로 패닝하며 촬영한 영상",
    "a three-storey grey building with a flat roof in daylight, camera panning left",
]


@dataclass
class TinySizes:
    image_size: int = 32      # encoder input side; the demo uses 64
    patch_size: int = 8       # (image_size / patch_size)^2 patch tokens per frame
    vision_width: int = 64
    vision_layers: int = 2
    text_width: int = 64
    text_layers: int = 2
    context_length: int = 48  # scorer text length; captions are short
    embed_dim: int = 64       # shared image-text embedding size of the scorer
    llm_hidden: int = 64
    llm_layers: int = 2
    llm_heads: int = 4
    vocab_size: int = 512     # tokenizer vocabulary (BPE merges on top of the byte alphabet)
    vision_head_width: int = 32
    llm_kv_heads: int | None = None         # None: llm_heads (no grouped-query attention)
    llm_intermediate: int | None = None     # None: 4 * llm_hidden
    llm_arch: str = "llama"                 # "llama" | "qwen2" (bias on q/k/v, as Qwen2)
    llm_vocab: int | None = None            # None: the tokenizer's size; larger pads the embedding / LM head


# Named shapes for `capguard init-checkpoint --preset`: random weights at the sizes of real models, for
# measuring engines and memory without downloading anything.
PRESETS = {
    "tiny": TinySizes(),
    # SigLIP-B/16 at 224 px (196 patch tokens per frame, width 768, 12 layers) + a Qwen2-0.5B-shaped LLM
    # (hidden 896, 24 layers, 14 query / 2 KV heads, MLP 4864, vocabulary 151936)
    "siglip-b16-qwen2-0.5b": TinySizes(image_size=224, patch_size=16, vision_width=768, vision_layers=12,
                                       vision_head_width=64, text_width=768, text_layers=12, context_length=64,
                                       embed_dim=768, llm_hidden=896, llm_layers=24, llm_heads=14,
                                       llm_kv_heads=2, llm_intermediate=4864, llm_arch="qwen2",
                                       llm_vocab=151936),
}


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: str | Path | None = None):
    """A byte-level BPE tokenizer (any Unicode input round-trips) as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id(SPECIAL_TOKENS["bos_token"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def clip_model_config(sizes: TinySizes, vocab_size: int) -> dict:
    """A SigLIP-style open_clip config (sigmoid loss bias, bidirectional text tower, last-token pool)."""
    return {
        "embed_dim": sizes.embed_dim,
        "init_logit_bias": -10,
        "custom_text": True,
        "vision_cfg": {"image_size": sizes.image_size, "patch_size": sizes.patch_size, "width": sizes.vision_width,
                       "layers": sizes.vision_layers, "head_width": sizes.vision_head_width, "mlp_ratio": 4.0},
        "text_cfg": {"context_length": sizes.context_length, "vocab_size": vocab_size, "width": sizes.text_width,
                     "heads": max(1, sizes.text_width // 32), "layers": sizes.text_layers, "no_causal_mask": True,
                     "pool_type": "last", "proj_bias": True, "pad_id": 2},
    }


def build_clip(model_cfg: dict) -> nn.Module:
    """Random-init open_clip model from a config dict (no hub, no files)."""
    name = f"capguard-{os.getpid()}-{id(model_cfg)}"
    open_clip.factory._MODEL_CONFIGS[name] = model_cfg  # open_clip's registry of named configs
    try:
        return create_open_clip(name)
    finally:
        open_clip.factory._MODEL_CONFIGS.pop(name, None)


def preprocess_config(image_size: int) -> dict:
    """Our small models' preprocessing: squash the frame to the input size (synthetic frames are
    square), scale to [-1, 1] like SigLIP."""
    return {"size": image_size, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear",
            "resize_mode": "squash"}


def write_open_clip_dir(model: nn.Module, model_cfg: dict, out_dir: str | Path,
                        tokenizer=None, dtype: torch.dtype | None = None) -> Path:
    """open_clip_config.json + open_clip_model.safetensors (+ tokenizer files), the layout open_clip reads."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    preprocess = preprocess_config(model_cfg["vision_cfg"]["image_size"])
    (out_dir / OPEN_CLIP_CONFIG).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess},
                                                       indent=2) + "\n")
    save_state_dict(model, out_dir / "open_clip_model.safetensors", dtype=dtype)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    return out_dir


def build_llm(tokenizer, sizes: TinySizes):
    """A random-init causal LM (Llama, or Qwen2 for the Qwen2-shaped preset) sized for the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM),
                             "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[sizes.llm_arch]
    config = config_cls(vocab_size=max(len(tokenizer), sizes.llm_vocab or 0), hidden_size=sizes.llm_hidden,
                        intermediate_size=sizes.llm_intermediate or sizes.llm_hidden * 4,
                        num_hidden_layers=sizes.llm_layers, num_attention_heads=sizes.llm_heads,
                        num_key_value_heads=sizes.llm_kv_heads or sizes.llm_heads,
                        max_position_embeddings=2048 if sizes.llm_arch == "llama" else 32768,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    return model_cls(config)


def write_llm_dir(llm, tokenizer, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """A transformers model dir (weights cast to ``dtype`` on disk only; the module is not changed)."""
    out_dir = Path(out_dir)
    state = None
    if dtype is not None:
        state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in llm.state_dict().items()}
    llm.save_pretrained(str(out_dir), state_dict=state)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def write_checkpoint(out_dir: str | Path, projector: nn.Module, projector_type: str, vision: str | VisionConfig,
                     llm_path: str, scorer: ScorerConfig | None = None, prompt: str = "<video>\n",
                     options: dict | None = None, info: dict | None = None,
                     generation: GenerationConfig | None = None, num_frames: int = 8,
                     dtype: torch.dtype | None = None) -> Path:
    """A checkpoint dir: projector.safetensors + capguard.json whose component paths are relative to it."""
    out_dir = Path(out_dir)
    save_state_dict(projector, out_dir / "projector.safetensors", dtype=dtype)
    vision = vision if isinstance(vision, VisionConfig) else VisionConfig(path=vision)
    config = CheckpointConfig(vision=vision,
                              projector=ProjectorConfig(type=projector_type, options=dict(options or {})),
                              llm=LLMConfig(path=llm_path), prompt=prompt, num_frames=num_frames,
                              generation=generation or GenerationConfig(), scorer=scorer,
                              name=out_dir.name, info=dict(info or {}))
    config.save(out_dir)
    return out_dir


def init_checkpoint(out_dir: str | Path, projector_type: str = "mlp2x_gelu", sizes: TinySizes | None = None,
                    options: dict | None = None, seed: int = 0, texts: list[str] | None = None) -> Path:
    """A complete random-init stack in one dir: encoder/scorer (open_clip), LLM, projector, manifest."""
    sizes = sizes or TinySizes()
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(texts or BOOTSTRAP_TEXT, sizes.vocab_size)
    model_cfg = clip_model_config(sizes, len(tokenizer))
    clip = build_clip(model_cfg)
    write_open_clip_dir(clip, model_cfg, out_dir / "siglip", tokenizer=tokenizer)
    llm = build_llm(tokenizer, sizes)
    write_llm_dir(llm, tokenizer, out_dir / "llm")
    projector = build_projector(projector_type, sizes.vision_width, sizes.llm_hidden,
                                (sizes.image_size // sizes.patch_size) ** 2, **(options or {}))
    return write_checkpoint(out_dir, projector, projector_type, "siglip", "llm",
                            scorer=ScorerConfig(path="siglip", tokenizer="siglip"), options=options,
                            info={"made_by": "capguard init-checkpoint", "seed": seed})


def copy_checkpoint(src: str | Path, dst: str | Path, name: str | None = None,
                    relink: tuple[str | Path, str | Path] | None = None) -> Path:
    """Copy a checkpoint dir elsewhere, rewriting component paths so they still reach the same files.

    Components inside ``src`` (e.g. a stage-2 ``llm/``) are copied along; shared ones stay where they are
    and are referenced by a new relative path. Example: runs/demo-mlp/epoch-7 -> checkpoints/demo, whose
    ``"../../shared/siglip"`` becomes ``"../../runs/shared/siglip"``; with ``relink=("runs/shared",
    "checkpoints/shared")`` (a copy of the shared dir made beforehand) it becomes ``"../shared/siglip"``.
    """
    import shutil

    src, dst = Path(src).resolve(), Path(dst).resolve()
    config = CheckpointConfig.load(src)
    shutil.copytree(src, dst, dirs_exist_ok=True)

    old, new = (Path(relink[0]).resolve(), Path(relink[1]).resolve()) if relink else (None, None)

    def moved(relative: str) -> str:
        target = (src / relative).resolve()
        if target.is_relative_to(src):
            return relative
        if old is not None and target.is_relative_to(old):
            target = new / target.relative_to(old)
        return os.path.relpath(target, dst)

    config.vision.path = moved(config.vision.path)
    config.llm.path = moved(config.llm.path)
    if config.scorer is not None:
        config.scorer.path = moved(config.scorer.path)
        if config.scorer.tokenizer:
            config.scorer.tokenizer = moved(config.scorer.tokenizer)
    config.name = name or dst.name
    config.save(dst)
    return dst
