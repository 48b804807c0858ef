"""Honeybee's convolutional C-Abstractor (Cha et al., 2024), loading Honeybee's own key names.

Honeybee's C-Abstractor is *not* the learned-queries + cross-attention design the field report
calls a C-Abstractor (Honeybee calls that one a resampler; capguard's ``c-abstractor``). It keeps
locality with convolutions:

    patch tokens (N = g*g per frame) + pos_emb
    -> RegNet stage (``depth`` bottleneck blocks, SiLU, LayerNorm2d; D_vision -> hidden)
    -> adaptive average pool to the query grid (q*q = num_queries)
    -> RegNet stage (hidden -> hidden)
    -> MLP readout (``mlp_depth`` Linear layers with SiLU between; hidden -> D_llm)

The RegNet stages are timm's ``RegStage`` blocks, the ones Honeybee builds on, so a state dict
saved by Honeybee (``abstractor.pos_emb``, ``abstractor.net.0.b1.conv1.conv.weight``,
``abstractor.readout.0.weight`` ...) loads strictly once ``abstractor.`` is stripped
(``honeybee_state_dict``).

Video: Honeybee is an image model. capguard applies the abstractor to each frame and concatenates
the frames' query tokens in time order: (B, T*N, D_vision) -> (B, T*Q, D_llm). Pooling over time
first would mix frames before the convolutions and lose what moves between them (camera motion is
one of the attributes the demo captions). Honeybee's optional ``eos_tokens`` are appended once per
video, after the last frame, as Honeybee appends them once per image.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn
from timm.layers import LayerNorm2d
from timm.models.regnet import RegStage

log = logging.getLogger(__name__)
HONEYBEE_PREFIX = "abstractor."


def reg_stage(depth: int, in_dim: int, out_dim: int) -> nn.Module:
    """A stride-1 RegNet stage as Honeybee configures it (its key names: ``b1.conv1.conv.weight`` ...)."""
    return RegStage(depth, in_dim, out_dim, stride=1, dilation=1, act_layer=nn.SiLU, norm_layer=LayerNorm2d)


def readout_mlp(depth: int, in_dim: int, out_dim: int) -> nn.Sequential:
    """Linear, then (SiLU, Linear) * (depth - 1): indices 0, 2, 4 ... hold the weights, as in Honeybee."""
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(depth - 1):
        layers += [nn.SiLU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


class HoneybeeCAbstractor(nn.Module):
    """Per-frame convolutional abstractor; forward: (B, T*N, D_vision) -> (B, T*Q (+E), D_llm).

    ``tokens_per_frame`` (N) comes from the encoder and must be a square (the patch grid, no CLS);
    ``num_queries`` (Q) must be a square too (the pooled grid).
    """

    def __init__(self, vision_dim: int, llm_dim: int, tokens_per_frame: int, num_queries: int = 144,
                 hidden_dim: int = 1024, depth: int = 3, mlp_depth: int = 2, pos_emb: bool = True,
                 prenorm: bool = False, num_eos_tokens: int = 0):
        super().__init__()
        grid, query_grid = math.isqrt(tokens_per_frame), math.isqrt(num_queries)
        if grid * grid != tokens_per_frame:
            raise ValueError(f"honeybee-c-abstractor needs a square patch grid per frame, got {tokens_per_frame} "
                             "tokens (use select_feature 'patch' so a CLS token is not counted)")
        if query_grid * query_grid != num_queries:
            raise ValueError(f"honeybee-c-abstractor num_queries must be a square number, got {num_queries}")
        if mlp_depth < 1:
            raise ValueError(f"honeybee-c-abstractor mlp_depth must be >= 1, got {mlp_depth}")
        self.grid, self.tokens_per_frame = grid, tokens_per_frame
        self.prenorm = nn.LayerNorm(vision_dim) if prenorm else None
        self.pos_emb = nn.Parameter(torch.zeros(1, tokens_per_frame, vision_dim)) if pos_emb else None  # (1, N, D)
        if self.pos_emb is not None:
            nn.init.trunc_normal_(self.pos_emb, std=0.02)
        pool = nn.AdaptiveAvgPool2d((query_grid, query_grid))
        if depth:
            self.net = nn.Sequential(reg_stage(depth, vision_dim, hidden_dim), pool,
                                     reg_stage(depth, hidden_dim, hidden_dim))
            self.readout = readout_mlp(mlp_depth, hidden_dim, llm_dim)
        else:   # Honeybee's depth-0 variant: pooling only, then the MLP
            self.net = pool
            self.readout = readout_mlp(mlp_depth, vision_dim, llm_dim)
        self.eos_tokens = nn.Parameter(torch.randn(1, num_eos_tokens, llm_dim) * 0.02) if num_eos_tokens else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        if length % self.tokens_per_frame:
            raise ValueError(f"honeybee-c-abstractor got {length} tokens, not a multiple of {self.tokens_per_frame} "
                             "tokens per frame")
        frames = x.reshape(-1, self.tokens_per_frame, dim)              # (B*T, N, D)
        if self.prenorm is not None:
            frames = self.prenorm(frames)
        if self.pos_emb is not None:
            frames = frames + self.pos_emb
        grid = frames.transpose(1, 2).reshape(-1, dim, self.grid, self.grid)   # (B*T, D, g, g)
        grid = self.net(grid)                                           # (B*T, H, q, q)
        tokens = self.readout(grid.flatten(2).transpose(1, 2))          # (B*T, Q, D_llm)
        out = tokens.reshape(batch, -1, tokens.shape[-1])               # (B, T*Q, D_llm)
        if self.eos_tokens is not None:
            out = torch.cat([out, self.eos_tokens.expand(batch, -1, -1)], dim=1)  # (B, T*Q + E, D_llm)
        return out


def honeybee_state_dict(state: dict[str, torch.Tensor], tokens_per_frame: int | None = None
                        ) -> dict[str, torch.Tensor]:
    """Honeybee's projector keys -> this module's.

    Example: {"abstractor.net.0.b1.conv1.conv.weight": w, "abstractor.pos_emb": p} ->
    {"net.0.b1.conv1.conv.weight": w, "pos_emb": p}. Keys without the prefix pass through (and a
    stray one is then named by the strict load). An old Honeybee ``pos_emb`` with one extra leading
    position (it once had one for CLS) loses that position, as Honeybee's own loader does.
    """
    out = {k[len(HONEYBEE_PREFIX):] if k.startswith(HONEYBEE_PREFIX) else k: v for k, v in state.items()}
    pos = out.get("pos_emb")
    if pos is not None and tokens_per_frame is not None and pos.dim() == 3 and pos.shape[1] == tokens_per_frame + 1:
        log.info("honeybee pos_emb has %d positions for %d patch tokens: dropping the first (CLS) position",
                 pos.shape[1], tokens_per_frame)
        out["pos_emb"] = pos[:, 1:]
    return out
