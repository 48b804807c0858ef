"""``capguard import``: a LLaVA-style transformers checkpoint -> a capguard checkpoint directory.

Reads a ``LlavaForConditionalGeneration`` or ``LlavaOnevisionForConditionalGeneration`` directory
(config.json, safetensors or .bin shards, tokenizer, image processor, chat template) and writes

    OUT/vision/                  the vision tower (CLIPVisionModel / SiglipVisionModel) + preprocessor_config.json
    OUT/llm/                     the language model as a causal LM (save_pretrained) + tokenizer
    OUT/projector.safetensors    multi_modal_projector.linear_1 / linear_2 -> mlp2x_gelu's 0 / 2
    OUT/capguard.json            vision.type "transformers", select_layer / select_feature from the
                                 config's vision_feature_layer / vision_feature_select_strategy, the prompt

Both key layouts load: the one transformers < 4.52 wrote (``language_model.model.*``,
``language_model.lm_head.*``, ``vision_tower.*``, ``multi_modal_projector.*``) and the newer one
(``model.language_model.*``, ``model.vision_tower.*``, ``model.multi_modal_projector.*``,
``lm_head.*``). Strict: a source key no rule consumes is an error that names it, and every part is
loaded into a module built from the source's own config, so a missing key or a wrong shape is an
error too. Modules are built on the meta device and take the source's tensors as they are (no random
init, no second copy): peak memory is about 1.5x the weights (measured: a 288M-parameter fp16 LLaVA,
550 MB on disk, imports in 6.8 s on one CPU thread with 818 MiB over the interpreter's baseline).

Onevision: ``image_newline`` (one learned token transformers appends after a video's tokens, after
pooling each frame 2x2) is dropped with a warning: capguard feeds every patch token of every frame
through the projector and appends nothing, so captions can differ from transformers' own video path.
``anyres`` tiling is for still images and plays no part for video frames.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from capguard.models.config import VIDEO_PLACEHOLDER, CheckpointError, ScorerConfig, VisionConfig
from capguard.models.weights import load_strict, read_state_dict, weight_files

log = logging.getLogger(__name__)
SUPPORTED = ("llava", "llava_onevision")
# (source prefix, part, prefix in the part): the new layout first, so "model.language_model." never
# falls through to a shorter rule
KEY_RULES = (
    ("model.language_model.", "llm", "model."),
    ("model.vision_tower.", "vision", ""),
    ("model.multi_modal_projector.", "projector", ""),
    ("model.image_newline", "dropped", "image_newline"),
    ("language_model.model.", "llm", "model."),
    ("language_model.lm_head.", "llm", "lm_head."),
    ("lm_head.", "llm", "lm_head."),
    ("vision_tower.", "vision", ""),
    ("multi_modal_projector.", "projector", ""),
    ("image_newline", "dropped", "image_newline"),
)
PROJECTOR_KEYS = {"linear_1.weight": "0.weight", "linear_1.bias": "0.bias",
                  "linear_2.weight": "2.weight", "linear_2.bias": "2.bias"}
PROCESSOR_KEYS = ("image_processor_type", "size", "crop_size", "do_center_crop", "do_resize", "resample",
                  "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std")
SELECT_FEATURE = {"default": "patch", "full": "cls_patch"}   # LLaVA's strategy names -> ours
DEFAULT_INSTRUCTION = "Describe this video."


def split_keys(state: dict[str, torch.Tensor], where: str) -> dict[str, dict[str, torch.Tensor]]:
    """Route every source key to its part, renamed for the part's own module.

    Example: {"language_model.model.norm.weight": a, "model.multi_modal_projector.linear_1.bias": b}
    -> {"llm": {"model.norm.weight": a}, "projector": {"linear_1.bias": b}, "vision": {}, "dropped": {}}.
    A key no rule matches is a CheckpointError naming it.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {"llm": {}, "vision": {}, "projector": {}, "dropped": {}}
    stray = []
    for key, value in state.items():
        for prefix, part, new in KEY_RULES:
            if key.startswith(prefix):
                parts[part][new + key[len(prefix):]] = value
                break
        else:
            stray.append(key)
    if stray:
        raise CheckpointError(f"{where}: keys that belong to no part of a LLaVA model: {', '.join(sorted(stray))}")
    return parts


def align_prefix(state: dict[str, torch.Tensor], target: set[str], prefix: str) -> dict[str, torch.Tensor]:
    """Add or strip ``prefix`` so the keys use the target module's naming (transformers 5's towers have no
    ``vision_model.`` level; checkpoints written before have one).

    Example: ({"vision_model.embeddings.class_embedding": c}, {"embeddings.class_embedding"}, "vision_model.")
    -> {"embeddings.class_embedding": c}.
    """
    source_has = all(k.startswith(prefix) for k in state)
    target_has = all(k.startswith(prefix) for k in target)
    if source_has and not target_has:
        return {k[len(prefix):]: v for k, v in state.items()}
    if target_has and not source_has:
        return {prefix + k: v for k, v in state.items()}
    return state


def read_weights(src: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every weight shard in ``src``; a key in two shards is an error."""
    files = [p for p in weight_files(src) if p.name.startswith(("model", "pytorch_model"))]
    if not files:
        raise CheckpointError(f"{src}: no model*.safetensors or pytorch_model*.bin weights")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        shard = read_state_dict(path)
        twice = set(shard) & set(state)
        if twice:
            raise CheckpointError(f"{path}: keys also in another shard: {', '.join(sorted(twice)[:8])}")
        state.update(shard)
    return state


def build_on_meta(factory, dtype: torch.dtype) -> nn.Module:
    """A module built from its config without allocating weights (they come from the source, by assign)."""
    with torch.device("meta"):
        return factory().to(dtype)


def import_llava(src: str | Path, out: str | Path, prompt: str | None = None, instruction: str | None = None,
                 scorer: str | Path | None = None, num_frames: int = 8, force: bool = False) -> Path:
    """Convert the LLaVA-style checkpoint ``src`` into a capguard checkpoint at ``out``; returns ``out``."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from capguard.models.components import write_checkpoint
    from capguard.models.projector import build_projector

    src, out = Path(src).resolve(), Path(out).resolve()
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{src} is not a transformers model directory: config.json is missing")
    if out.exists() and any(out.iterdir()) and not force:
        raise CheckpointError(f"{out} exists and is not empty; pass --force to write into it")
    if scorer is not None and not (Path(scorer) / "open_clip_config.json").is_file():
        raise CheckpointError(f"--scorer {scorer} is not an open_clip model directory (open_clip_config.json)")
    try:
        config = AutoConfig.from_pretrained(str(src), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - an unknown model_type, a broken config.json, ...
        raise CheckpointError(f"cannot read {src}/config.json: {exc}") from exc
    layer, select_feature = feature_selection(config, src)
    parts = split_keys(read_weights(src), str(src))
    if parts["dropped"] and config.model_type != "llava_onevision":
        raise CheckpointError(f"{src}: {', '.join(parts['dropped'])} in a {config.model_type} checkpoint (only "
                              "LLaVA-Onevision has an image_newline)")
    # each part keeps its own dtype on disk (a fp32 tower beside a bf16 LM is not rounded to bf16)
    dtype = {part: next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
             for part, state in parts.items()}

    from capguard.models.hf_vision import PROCESSOR_CONFIG, preprocess_config, tower_class

    tower_class(config.vision_config.model_type, f"{src}/config.json")   # a supported tower, or a clear error
    vision = build_on_meta(lambda: AutoModel.from_config(config.vision_config), dtype["vision"])
    vision_state = align_prefix(parts["vision"], set(vision.state_dict()), "vision_model.")
    load_strict(vision, vision_state, f"{src} (vision_tower)", assign=True)

    llm = build_on_meta(lambda: AutoModelForCausalLM.from_config(config.text_config), dtype["llm"])
    llm_state = parts["llm"]
    tied = getattr(config.text_config, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False)
    if tied and "lm_head.weight" not in llm_state and "model.embed_tokens.weight" in llm_state:
        llm_state["lm_head.weight"] = llm_state["model.embed_tokens.weight"]   # tied: one tensor on disk
    load_strict(llm, llm_state, f"{src} (language_model)", assign=True)

    projector = build_projector("mlp2x_gelu", config.vision_config.hidden_size, config.text_config.hidden_size)
    renamed = {PROJECTOR_KEYS.get(k, k): v for k, v in parts["projector"].items()}
    load_strict(projector, renamed, f"{src} (multi_modal_projector)")
    if parts["dropped"]:
        log.warning("%s: dropped %s: transformers appends this token after a video's (2x2-pooled) frame "
                    "tokens; capguard feeds every frame's patch tokens and appends nothing",
                    src, ", ".join(sorted(parts["dropped"])))

    processor_path = src / PROCESSOR_CONFIG
    if not processor_path.is_file():
        raise CheckpointError(f"{src}: {PROCESSOR_CONFIG} is missing; the image processor's size, mean and std "
                              "are needed (save the processor with save_pretrained into the checkpoint dir)")
    processor = {k: v for k, v in json.loads(processor_path.read_text()).items() if k in PROCESSOR_KEYS}
    preprocess_config(processor, str(processor_path))   # fail now, not at load time

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - missing or unreadable tokenizer files
        raise CheckpointError(f"cannot load the tokenizer from {src}: {exc}") from exc
    text = import_prompt(tokenizer, src, config, prompt, instruction)

    out.mkdir(parents=True, exist_ok=True)
    for sub in ("vision", "llm"):
        shutil.rmtree(out / sub, ignore_errors=True)
    vision.save_pretrained(str(out / "vision"))
    (out / "vision" / PROCESSOR_CONFIG).write_text(json.dumps(processor, indent=2) + "\n")
    llm.tie_weights()
    llm.save_pretrained(str(out / "llm"))
    tokenizer.save_pretrained(str(out / "llm"))
    scorer_cfg = None
    if scorer is not None:
        scorer = Path(scorer).resolve()
        scorer_cfg = ScorerConfig(path=os.path.relpath(scorer, out),
                                  tokenizer=os.path.relpath(scorer, out) if (scorer / "tokenizer.json").is_file()
                                  else None)
    vision_cfg = VisionConfig(path="vision", select_layer=layer, select_feature=select_feature, type="transformers")
    info = {"imported_from": str(src), "architecture": (config.architectures or [config.model_type])[0],
            "dropped": sorted(parts["dropped"])}
    write_checkpoint(out, projector, "mlp2x_gelu", vision_cfg, "llm", scorer=scorer_cfg, prompt=text,
                     num_frames=num_frames, info=info, dtype=dtype["projector"])
    log.info("imported %s -> %s (prompt %r)", src, out, text)
    return out


def feature_selection(config, src: Path) -> tuple[int, str]:
    """(select_layer, select_feature) from a LLaVA config; what capguard cannot reproduce is an error.

    Example: vision_feature_layer -2, vision_feature_select_strategy "default" -> (-2, "patch").
    """
    if config.model_type not in SUPPORTED:
        raise CheckpointError(f"{src}: model_type {config.model_type!r} is not supported; "
                              f"expected one of {', '.join(SUPPORTED)}")
    layer, strategy = config.vision_feature_layer, config.vision_feature_select_strategy
    if not isinstance(layer, int):
        raise CheckpointError(f"{src}: vision_feature_layer {layer!r} (several layers concatenated) is not "
                              "supported; capguard reads one layer")
    if strategy not in SELECT_FEATURE:
        raise CheckpointError(f"{src}: vision_feature_select_strategy {strategy!r} is not one of "
                              f"{', '.join(SELECT_FEATURE)}")
    act, bias = getattr(config, "projector_hidden_act", "gelu"), getattr(config, "multimodal_projector_bias", True)
    if act != "gelu" or not bias:
        raise CheckpointError(f"{src}: only LLaVA's Linear-GELU-Linear projector with biases maps onto mlp2x_gelu "
                              f"(projector_hidden_act={act!r}, multimodal_projector_bias={bias!r})")
    return layer, SELECT_FEATURE[strategy]


def import_prompt(tokenizer, src: Path, config, prompt: str | None, instruction: str | None) -> str:
    """The capguard prompt: ``prompt`` as given, else the chat template rendered for one user turn of
    [image, instruction] with a generation prompt, the image token turned into ``<video>``.

    Example (LLaVA-1.5's template): "USER: <image>\\nDescribe this video. ASSISTANT:" ->
    "USER: <video>\\nDescribe this video. ASSISTANT:". The tokenizer's BOS text is removed from the
    front (the captioner adds BOS itself). Without a chat template the LLaVA-1.5 form is used.
    """
    image_token = tokenizer.convert_ids_to_tokens(config.image_token_index) if getattr(
        config, "image_token_index", None) is not None else "<image>"
    if prompt is not None:
        text = prompt.replace(image_token, VIDEO_PLACEHOLDER)
        if VIDEO_PLACEHOLDER not in text:
            raise CheckpointError(f"--prompt must contain {image_token} or {VIDEO_PLACEHOLDER}")
        return text
    instruction = instruction or DEFAULT_INSTRUCTION
    template = tokenizer.chat_template or _saved_template(src)
    if template is None:
        log.warning("%s has no chat template: using LLaVA-1.5's 'USER: <image>\\n... ASSISTANT:' form", src)
        return f"USER: {VIDEO_PLACEHOLDER}\n{instruction} ASSISTANT:"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=True)
    if text.count(image_token) != 1:
        raise CheckpointError(f"{src}: the chat template renders {text.count(image_token)} {image_token} tokens "
                              f"for one image ({text!r}); pass --prompt")
    if tokenizer.bos_token and text.startswith(tokenizer.bos_token):
        text = text[len(tokenizer.bos_token):]
    return text.replace(image_token, VIDEO_PLACEHOLDER)


def _saved_template(src: Path) -> str | None:
    """A processor's chat template, saved beside the model (chat_template.jinja or chat_template.json)."""
    if (src / "chat_template.jinja").is_file():
        return (src / "chat_template.jinja").read_text()
    if (src / "chat_template.json").is_file():
        return json.loads((src / "chat_template.json").read_text()).get("chat_template")
    return None
