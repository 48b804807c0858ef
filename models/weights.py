"""Weight files: read safetensors (or a torch pickle with ``weights_only``), load strictly, fingerprint.

Strict means every missing key, unexpected key and shape mismatch is reported by name in one
error, never skipped: a checkpoint that silently loads half its projector is the kind of bug
that looks like mode collapse.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from capguard.models.config import CheckpointError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weight file: safetensors first, ``torch.load(weights_only=True)`` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weight file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
        raise CheckpointError(f"cannot read weights from {path}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a flat dict of tensors")
    return state


def save_state_dict(module_or_state: nn.Module | dict[str, torch.Tensor], path: str | Path,
                    dtype: torch.dtype | None = None) -> Path:
    """Write contiguous CPU tensors as safetensors (optionally cast floating tensors to ``dtype``)."""
    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    out = {}
    for key, value in state.items():
        value = value.detach().cpu()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        out[key] = value.contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path))
    path.chmod(0o644)   # safetensors writes 0600; checkpoints are read by other users (e.g. a container's)
    return path


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], where: str, assign: bool = False) -> None:
    """Load ``state`` into ``module``; raise CheckpointError naming every incompatibility. ``assign`` hands the
    tensors over instead of copying (a module built on the meta device; capguard.models.importer).

    Example: a projector built for 512->256 given a 512->128 weight raises
    "projector.safetensors: shape mismatch: 0.weight checkpoint (128, 512) vs model (256, 512)".
    """
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [f"{k} checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sorted(set(own) & set(state)) if own[k].shape != state[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_short(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch: {_short(mismatched)}")
    if problems:
        raise CheckpointError(f"{where}: " + "; ".join(problems))
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True, assign=assign)


def _short(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def weight_files(directory: str | Path) -> list[Path]:
    """The weight files directly inside a component directory, sorted by name."""
    return sorted(p for p in Path(directory).iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def fingerprint(files: list[Path], chunk: int = 1 << 20) -> str:
    """sha256 over the bytes of ``files`` in the given order (each prefixed by its size).

    Two checkpoints share a fingerprint only when every weight byte matches; a renamed
    directory keeps its fingerprint.
    """
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.stat().st_size).encode() + b"\0")
        with open(path, "rb") as fh:
            while block := fh.read(chunk):
                digest.update(block)
    return digest.hexdigest()
