"""Projectors: map vision tokens (B, T*N, D_vision) into the LLM's embedding space (B, Q, D_llm).

Three designs, as compared in the field report, and Honeybee's convolutional abstractor:
- ``linear``: one Linear per token (LLaVA-1.0). No compression: Q = T*N.
- ``mlp2x_gelu``: Linear -> GELU -> Linear (LLaVA-1.5). Module indices 0 and 2, so LLaVA's
  ``mm_projector.bin`` (keys ``model.mm_projector.0.weight`` ...) loads after prefix stripping.
- ``c-abstractor``: the field report's design: ``num_queries`` learnable queries cross-attend
  over all frames' tokens, Q = num_queries (72:1 compression at 4608 tokens -> 64 queries).
  Honeybee calls this design a *resampler*; ``resampler`` is accepted as its other name.
- ``honeybee-c-abstractor``: Honeybee's real C-Abstractor (RegNet convolutions, adaptive pooling,
  MLP readout), per frame; it loads Honeybee's key names (capguard.models.honeybee).

One small builder turns the type string saved in the checkpoint into a module; anything
unknown is a ValueError. Dimensions come from the connected encoder and LLM (Honeybee-style),
never typed by hand.
"""

from __future__ import annotations

import torch
import torch.nn as nn

PROJECTOR_TYPES = ("linear", "mlp2x_gelu", "c-abstractor", "honeybee-c-abstractor")
ALIASES = {"resampler": "c-abstractor"}   # Honeybee's name for the learned-queries design


class CAbstractor(nn.Module):
    """Learnable queries + cross-attention over every frame's patch tokens, then an MLP into the LLM.

    forward: (B, L, D_vision) -> (B, num_queries, D_llm), whatever L is.
    """

    def __init__(self, vision_dim: int, llm_dim: int, num_queries: int = 64, num_heads: int = 8,
                 dropout: float = 0.1, hidden_dim: int | None = None):
        super().__init__()
        hidden = hidden_dim or llm_dim
        if hidden % num_heads:
            raise ValueError(f"c-abstractor hidden size {hidden} is not divisible by num_heads={num_heads}")
        self.kv_proj = nn.Linear(vision_dim, hidden)
        self.queries = nn.Parameter(torch.randn(num_queries, hidden) * hidden**-0.5)  # (Q, H)
        self.pos_drop = nn.Dropout(dropout)
        self.norm_q = nn.LayerNorm(hidden)
        self.norm_kv = nn.LayerNorm(hidden)
        self.cross_attn = nn.MultiheadAttention(hidden, num_heads, dropout=dropout, batch_first=True)
        self.norm_out = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = self.norm_kv(self.kv_proj(x))                             # (B, L, H)
        q = self.norm_q(self.pos_drop(self.queries)).expand(x.shape[0], -1, -1)  # (B, Q, H)
        attn, _ = self.cross_attn(q, kv, kv, need_weights=False)        # (B, Q, H)
        return self.mlp(self.norm_out(q + attn))                        # (B, Q, D_llm)


def build_projector(projector_type: str, vision_dim: int, llm_dim: int, tokens_per_frame: int | None = None,
                    **options) -> nn.Module:
    """Build a projector from its type string; dims come from the encoder and the LLM (and, for the
    per-frame ``honeybee-c-abstractor``, the encoder's tokens per frame).

    Example: build_projector("mlp2x_gelu", 1024, 4096) -> Sequential(Linear(1024, 4096), GELU, Linear(4096, 4096))
    """
    projector_type = ALIASES.get(projector_type, projector_type)
    if projector_type == "linear":
        _no_options(projector_type, options)
        return nn.Linear(vision_dim, llm_dim)
    if projector_type == "mlp2x_gelu":
        _no_options(projector_type, options)
        return nn.Sequential(nn.Linear(vision_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))
    if projector_type == "c-abstractor":
        allowed = {"num_queries", "num_heads", "dropout", "hidden_dim"}
        unknown = set(options) - allowed
        if unknown:
            raise ValueError(f"unknown c-abstractor options {sorted(unknown)}; allowed: {sorted(allowed)}")
        return CAbstractor(vision_dim, llm_dim, **options)
    if projector_type == "honeybee-c-abstractor":
        from capguard.models.honeybee import HoneybeeCAbstractor

        allowed = {"num_queries", "hidden_dim", "depth", "mlp_depth", "pos_emb", "prenorm", "num_eos_tokens"}
        unknown = set(options) - allowed
        if unknown:
            raise ValueError(f"unknown honeybee-c-abstractor options {sorted(unknown)}; allowed: {sorted(allowed)}")
        if tokens_per_frame is None:
            raise ValueError("honeybee-c-abstractor needs the encoder's tokens per frame")
        return HoneybeeCAbstractor(vision_dim, llm_dim, tokens_per_frame, **options)
    raise ValueError(f"unknown projector type {projector_type!r}; expected one of {', '.join(PROJECTOR_TYPES)} "
                     f"(or {', '.join(ALIASES)})")


def _no_options(projector_type: str, options: dict) -> None:
    if options:
        raise ValueError(f"projector {projector_type!r} takes no options, got {sorted(options)}")


def strip_llava_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map LLaVA projector keys onto ours.

    Example: {"model.mm_projector.0.weight": w} -> {"0.weight": w}; a linear LLaVA-1.0 projector
    ({"model.mm_projector.weight": w}) -> {"weight": w}. Keys without the prefix pass through.
    """
    out = {}
    for key, value in state_dict.items():
        for prefix in ("model.mm_projector.", "mm_projector."):
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        out[key] = value
    return out


def projector_state_dict(projector_type: str, state: dict[str, torch.Tensor], from_safetensors: bool,
                         tokens_per_frame: int | None = None) -> dict[str, torch.Tensor]:
    """Key names of a foreign projector file -> ours: Honeybee's ``abstractor.*`` for its C-Abstractor,
    LLaVA's ``mm_projector.*`` for a ``.bin`` file; capguard's own safetensors pass through."""
    if projector_type == "honeybee-c-abstractor":
        from capguard.models.honeybee import honeybee_state_dict

        return honeybee_state_dict(state, tokens_per_frame)
    return state if from_safetensors else strip_llava_prefix(state)
