"""Vision side: open_clip models from local directories, batched tensor preprocessing, patch tokens.

An open_clip component directory holds ``open_clip_config.json`` ({"model_cfg", "preprocess_cfg"})
and ``open_clip_model.safetensors`` (or ``open_clip_pytorch_model.bin``): the layout open_clip
itself writes and the hub snapshots of SigLIP/CLIP models use. Nothing is fetched from a hub.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F

from capguard.models.config import CheckpointError
from capguard.models.weights import load_strict, read_state_dict, weight_files

log = logging.getLogger(__name__)
OPEN_CLIP_CONFIG = "open_clip_config.json"


class _NoFalseRandomInitWarning(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded ... initialized randomly" root-logger warning.

    ``create_model(..., load_weights=False)`` always logs it, yet capguard loads the weights strictly right
    after (or, for a fresh component, means to start random): a new user's first ``make serve`` would show
    a false warning on every checkpoint load. Only that message is dropped, only while building.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded for model")


def create_open_clip(name: str) -> nn.Module:
    """``open_clip.create_model(name, load_weights=False)`` without its false random-init warning."""
    root = logging.getLogger()
    quiet = _NoFalseRandomInitWarning()
    root.addFilter(quiet)
    try:
        return open_clip.create_model(name, load_weights=False)
    finally:
        root.removeFilter(quiet)


def load_open_clip(directory: str | Path) -> tuple[nn.Module, dict]:
    """Build an open_clip model from a local dir and load its weights strictly; returns (model, preprocess_cfg)."""
    directory = Path(directory)
    cfg_path = directory / OPEN_CLIP_CONFIG
    if not cfg_path.is_file():
        raise CheckpointError(f"{directory} is not an open_clip model directory: {OPEN_CLIP_CONFIG} is missing")
    files = [p for p in weight_files(directory) if p.name.startswith("open_clip")]
    if not files:
        raise CheckpointError(f"{directory}: no open_clip_model.safetensors (or open_clip_pytorch_model.bin)")
    try:
        model = create_open_clip(f"local-dir:{directory}")
    except Exception as exc:  # noqa: BLE001 - config errors come in many types
        raise CheckpointError(f"{cfg_path}: cannot build the open_clip model: {exc}") from exc
    load_strict(model, read_state_dict(files[0]), str(files[0]))
    model.eval()
    preprocess = dict(open_clip.get_model_preprocess_cfg(model))
    preprocess.update(json.loads(cfg_path.read_text()).get("preprocess_cfg", {}))
    return model, preprocess


class FramePreprocessor(nn.Module):
    """Batched uint8 frames -> normalized pixels, following the model's own preprocess config.

    Does what open_clip's PIL pipeline does (resize the shortest side of the uint8 image, centre crop, scale
    to [0, 1], normalize) on tensors, so 8 frames x B videos are one interpolate call instead of 8B PIL images.
    """

    def __init__(self, cfg: dict):
        super().__init__()
        size = cfg.get("size", 224)
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.resize_mode = cfg.get("resize_mode", "shortest")
        self.interpolation = cfg.get("interpolation", "bicubic")
        # transformers' image processors truncate the resized side (int), open_clip's config here rounds
        self.floor = cfg.get("resize_rounding", "round") == "floor"
        self.register_buffer("mean", torch.tensor(cfg.get("mean", (0.5, 0.5, 0.5))).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.get("std", (0.5, 0.5, 0.5))).view(1, 3, 1, 1), persistent=False)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """(F, H, W, 3) uint8 -> (F, 3, S, S) float."""
        x = frames.permute(0, 3, 1, 2)   # (F, 3, H, W) uint8, a channels-last view of the HWC frames
        h, w = x.shape[-2:]
        th, tw = self.size
        if self.resize_mode == "squash":
            new_h, new_w = th, tw
        else:  # "shortest": cover the crop then centre-crop; "longest": fit inside then pad
            scale = max(th / h, tw / w) if self.resize_mode == "shortest" else min(th / h, tw / w)
            if self.floor:   # + 1e-6: 90 * (56 / 90) is 55.99999... in floating point, and must stay 56
                new_h, new_w = int(h * scale + 1e-6), int(w * scale + 1e-6)
            else:
                new_h, new_w = round(h * scale), round(w * scale)
        if (new_h, new_w) != (h, w):
            x = self._resize(x, (new_h, new_w))
        if self.resize_mode == "longest":
            x = F.pad(x, (0, tw - new_w, 0, th - new_h))
        top, left = (x.shape[-2] - th) // 2, (x.shape[-1] - tw) // 2
        x = x[..., top:top + th, left:left + tw].float().div_(255.0)
        return ((x - self.mean) / self.std).contiguous()

    def _resize(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Antialiased resize of uint8 frames to uint8, as PIL resizes an RGB image (what open_clip's transforms
        and transformers' image processors do before scaling to [0, 1]). torch's uint8 kernels stay within a
        level or two of PIL (tests/test_perf_paths.py) and are ~8x faster than a float resize, which strays up to
        24 levels from PIL where bicubic overshoots (PIL clips between its passes). They run on the CPU only,
        so frames on another device come to the CPU for it: every device then sees the same pixels."""
        mode = "bicubic" if self.interpolation == "bicubic" else "bilinear"
        y = F.interpolate(x.cpu(), size=size, mode=mode, antialias=True, align_corners=False)
        return y.to(x.device)


class VisionEncoder(nn.Module):
    """Per-frame patch tokens from one block of an open_clip vision tower (LLaVA-style feature select).

    forward: (F, 3, S, S) pixels -> (F, N, D) tokens; with ``pooled=True`` also the tower's own
    pooled image embedding (F, E), so a scorer sharing this tower costs no second forward pass.
    """

    def __init__(self, visual: nn.Module, preprocess_cfg: dict, select_layer: int = -2,
                 select_feature: str = "patch"):
        super().__init__()
        self.visual = visual
        self.preprocess = FramePreprocessor(preprocess_cfg)
        self.select_layer = select_layer
        self.select_feature = select_feature
        weight = next(visual.parameters())
        with torch.inference_mode():
            probe = self.visual.forward_intermediates(
                weight.new_zeros(1, 3, *self.preprocess.size), indices=[select_layer], intermediates_only=True,
                output_fmt="NLC", output_extra_tokens=True)
        tokens = self._select(probe)
        self.tokens_per_frame, self.width = tokens.shape[1], tokens.shape[2]

    def _select(self, out: dict) -> torch.Tensor:
        patches = out["image_intermediates"][0]                          # (F, N, D)
        if self.select_feature == "cls_patch":
            prefix = out.get("image_intermediates_prefix")
            if prefix:
                patches = torch.cat([prefix[0], patches], dim=1)
        return patches

    def forward(self, pixels: torch.Tensor, pooled: bool = False):
        out = self.visual.forward_intermediates(
            pixels, indices=[self.select_layer], intermediates_only=not pooled, output_fmt="NLC",
            output_extra_tokens=self.select_feature == "cls_patch")
        tokens = self._select(out)
        if pooled:
            return tokens, out["image_features"]
        return tokens


def frames_to_tensor(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(T, H, W, 3) uint8 array -> tensor without copying when possible."""
    if isinstance(frames, torch.Tensor):
        return frames
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    return torch.from_numpy(np.ascontiguousarray(frames))

