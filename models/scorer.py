"""Caption scorer: a SigLIP (or CLIP) model through open_clip, from local files.

Video embedding = normalized mean of the normalized frame embeddings. SigLIP score =
sigmoid(exp(logit_scale) * cos + logit_bias), the model's own pairwise probability; CLIP models
get a CLIPScore-style 2.5 * max(cos, 0). The embeddings also feed the guard's grounding metric
(does each caption retrieve its own video?), which a generic caption cannot pass.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F

from capguard.models.config import CheckpointError

log = logging.getLogger(__name__)


def load_tokenizer(model_dir: Path, tokenizer_dir: Path | None, context_length: int):
    """An open_clip tokenizer: a local HF tokenizer dir when given, else what the model's config names."""
    try:
        if tokenizer_dir is not None:
            return open_clip.tokenizer.HFTokenizer(str(tokenizer_dir), context_length=context_length)
        return open_clip.get_tokenizer(f"local-dir:{model_dir}", context_length=context_length)
    except Exception as exc:  # noqa: BLE001 - missing files, offline hub lookups, bad configs
        raise CheckpointError(f"cannot load the scorer tokenizer for {model_dir} "
                              f"(tokenizer={tokenizer_dir}): {exc}. Put tokenizer.json in a local dir and set "
                              f"scorer.tokenizer in capguard.json") from exc


def pool_frames(image_emb: torch.Tensor, frames_per_video: list[int]) -> torch.Tensor:
    """(sum T, E) frame embeddings -> (B, E) video embeddings: normalize, mean per video, normalize again.

    The one definition of a video's embedding: the scorer uses it at inference, and training
    (capguard.models.train) through autograd, so the scorer is trained on what it later computes.
    Example: two videos of 8 frames each -> image_emb (16, E), frames_per_video [8, 8] -> (2, E).
    """
    frames = F.normalize(image_emb.float(), dim=-1)
    return F.normalize(torch.stack([f.mean(0) for f in torch.split(frames, frames_per_video)]), dim=-1)


class Scorer(nn.Module):
    def __init__(self, model: nn.Module, tokenizer):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        # HF fast tokenizers set padding/truncation state on each call and fail ("Already borrowed") when two
        # threads tokenize at once (a server with several model threads); tokenizing is microseconds
        self._tokenizing = threading.Lock()
        self.kind = "siglip" if getattr(model, "logit_bias", None) is not None else "clip"

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @torch.inference_mode()
    def video_embeddings(self, image_emb: torch.Tensor, frames_per_video: list[int]) -> torch.Tensor:
        """Pooled frame features (sum T, E) -> (B, E), see ``pool_frames``."""
        return pool_frames(image_emb, frames_per_video)

    @torch.inference_mode()
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(F, 3, S, S) -> (F, E) unnormalized; used when the captioner's tower is a different model."""
        return self.model.encode_image(pixels)

    @torch.inference_mode()
    def text_embeddings(self, captions: list[str]) -> torch.Tensor:
        with self._tokenizing:
            tokens = self.tokenizer(captions)
        tokens = tokens.to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)   # (B, E)

    @torch.inference_mode()
    def scores(self, text_emb: torch.Tensor, video_emb: torch.Tensor) -> torch.Tensor:
        """Row-wise scores of caption i against video i, in [0, 1] (SigLIP) or [0, 2.5] (CLIP)."""
        cos = (text_emb * video_emb).sum(-1)
        if self.kind == "siglip":
            return torch.sigmoid(self.model.logit_scale.exp() * cos + self.model.logit_bias).float()
        return 2.5 * cos.clamp(min=0)
