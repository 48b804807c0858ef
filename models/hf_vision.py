"""Vision towers saved by transformers (``CLIPVisionModel``, ``SiglipVisionModel``), beside open_clip.

A tower directory holds ``config.json`` + weights as ``save_pretrained`` writes them, and
``preprocessor_config.json`` as an image processor's ``save_pretrained`` writes it. The directory of
a whole ``CLIPModel`` / ``SiglipModel`` works too: its vision half is loaded and the text half's
keys (``text_model.*``, ``logit_scale`` ...) are the only ones allowed to go unused.

Features follow LLaVA's ``select_layer`` / ``select_feature``: ``hidden_states[select_layer]``
(index 0 is the patch embeddings, so -2 is the penultimate block's output, LLaVA's default);
``patch`` drops CLIP's CLS token (SigLIP has none), ``cls_patch`` keeps it. The encoder has the
open_clip ``VisionEncoder``'s interface (``preprocess``, ``tokens_per_frame``, ``width``,
``forward(pixels) -> (F, N, D)``), so the captioner does not know which kind it holds.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn as nn

from capguard.models.config import CheckpointError
from capguard.models.encoder import FramePreprocessor

log = logging.getLogger(__name__)
PROCESSOR_CONFIG = "preprocessor_config.json"
# model_type in config.json -> the transformers class that holds its vision tower
TOWER_CLASSES = {"clip_vision_model": "CLIPVisionModel", "clip": "CLIPVisionModel",
                 "siglip_vision_model": "SiglipVisionModel", "siglip": "SiglipVisionModel"}
# PIL resample codes image processors save -> FramePreprocessor interpolation
RESAMPLE = {2: "bilinear", 3: "bicubic"}


def tower_class(model_type: str, where: str):
    """The transformers class for a config's ``model_type``; anything else is a CheckpointError."""
    import transformers

    if model_type not in TOWER_CLASSES:
        raise CheckpointError(f"{where}: vision model_type {model_type!r} is not supported; "
                              f"expected one of {', '.join(TOWER_CLASSES)}")
    return getattr(transformers, TOWER_CLASSES[model_type])


def preprocess_config(processor: dict, where: str) -> dict:
    """An image processor's saved settings -> FramePreprocessor's config.

    Example: CLIP's {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336},
    "do_center_crop": true, "resample": 3, "image_mean": m, "image_std": s} -> {"size": (336, 336),
    "resize_mode": "shortest", "resize_rounding": "floor", "interpolation": "bicubic", "mean": m, "std": s}; SigLIP's
    {"size": {"height": 384, "width": 384}} (no crop) -> {"size": (384, 384), "resize_mode": "squash"}.
    """
    if processor.get("do_rescale", True) and abs(processor.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-9:
        raise CheckpointError(f"{where}: rescale_factor {processor['rescale_factor']} is not 1/255")
    size = processor.get("size", {})
    crop = processor.get("crop_size") if processor.get("do_center_crop", False) else None
    if isinstance(size, int):
        size = {"shortest_edge": size}
    if crop:
        crop = (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop, crop)
        edge = size.get("shortest_edge", min(crop))
        if edge != min(crop):
            # resize to `edge` then crop a smaller centre: the crop keeps the central min(crop)/edge of the
            # frame, where our resize covers the crop exactly; warn instead of pretending to match
            log.warning("%s: shortest_edge %s with a %s crop is read as resize-to-crop (the frame's border "
                        "that the processor would crop away is kept)", where, edge, crop)
        out = {"size": crop, "resize_mode": "shortest", "resize_rounding": "floor"}
    elif "height" in size and "width" in size:
        out = {"size": (size["height"], size["width"]), "resize_mode": "squash"}
    elif "shortest_edge" in size:
        out = {"size": size["shortest_edge"], "resize_mode": "shortest", "resize_rounding": "floor"}
    else:
        raise CheckpointError(f"{where}: cannot read the input size from {size!r}")
    resample = processor.get("resample", 3)
    if resample not in RESAMPLE:
        log.warning("%s: resample %s is read as bicubic (only bilinear 2 and bicubic 3 are implemented)",
                    where, resample)
    out["interpolation"] = RESAMPLE.get(resample, "bicubic")
    if processor.get("do_normalize", True):
        out["mean"], out["std"] = list(processor["image_mean"]), list(processor["image_std"])
    else:
        out["mean"], out["std"] = [0.0] * 3, [1.0] * 3
    return out


def load_tower(directory: str | Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, dict]:
    """A transformers vision tower and its preprocessing from a local dir; (model, preprocess_cfg)."""
    directory = Path(directory)
    cfg_path, proc_path = directory / "config.json", directory / PROCESSOR_CONFIG
    if not cfg_path.is_file():
        raise CheckpointError(f"{directory} is not a transformers model directory: config.json is missing")
    if not proc_path.is_file():
        raise CheckpointError(f"{directory}: {PROCESSOR_CONFIG} is missing (save the image processor with "
                              "save_pretrained into the tower's directory)")
    model_type = json.loads(cfg_path.read_text()).get("model_type", "")
    cls = tower_class(model_type, str(cfg_path))
    try:
        model, info = cls.from_pretrained(str(directory), local_files_only=True, dtype=dtype,
                                          output_loading_info=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for bad dirs
        raise CheckpointError(f"cannot load the vision tower from {directory}: {exc}") from exc
    whole = model_type in ("clip", "siglip")    # a whole CLIPModel / SiglipModel: its text half goes unused
    unused = [k for k in info.get("unexpected_keys", []) if not (whole and _text_half(k))]
    problems = {"missing_keys": info.get("missing_keys"), "unexpected_keys": unused,
                "mismatched_keys": info.get("mismatched_keys")}
    problems = {k: sorted(v) for k, v in problems.items() if v}
    if problems:
        raise CheckpointError(f"vision tower weights in {directory} do not match its config: {problems}")
    return model.eval(), preprocess_config(json.loads(proc_path.read_text()), str(proc_path))


def _text_half(key: str) -> bool:
    """Keys of a whole CLIP/SigLIP model that its vision tower does not use."""
    return key.startswith(("text_model.", "text_projection", "visual_projection", "logit_scale", "logit_bias"))


class HFVisionEncoder(nn.Module):
    """Per-frame tokens from ``hidden_states[select_layer]`` of a transformers tower.

    forward: (F, 3, S, S) pixels -> (F, N, D) tokens. A transformers tower is never the scorer, so
    ``pooled=True`` is refused (the stack scores with an open_clip model and its own preprocessing).
    """

    def __init__(self, tower: nn.Module, preprocess_cfg: dict, select_layer: int = -2,
                 select_feature: str = "patch"):
        super().__init__()
        self.tower = tower
        self.preprocess = FramePreprocessor(preprocess_cfg)
        self.select_layer, self.select_feature = select_layer, select_feature
        # CLIP's embeddings prepend a learned CLS token; SigLIP's do not
        self.has_cls = any(name.endswith("class_embedding") for name, _ in tower.named_parameters())
        weight = next(tower.parameters())
        with torch.inference_mode():
            probe = self(weight.new_zeros(1, 3, *self.preprocess.size))
        self.tokens_per_frame, self.width = probe.shape[1], probe.shape[2]

    def forward(self, pixels: torch.Tensor, pooled: bool = False) -> torch.Tensor:
        if pooled:
            raise ValueError("a transformers vision tower gives no pooled scorer embedding; score with open_clip")
        hidden = self.tower(pixel_values=pixels, output_hidden_states=True).hidden_states
        tokens = hidden[self.select_layer]                              # (F, [1 +] N, D)
        if self.has_cls and self.select_feature == "patch":
            tokens = tokens[:, 1:]                                      # (F, N, D)
        return tokens
