"""The LLM's input embedding table alone, read from its checkpoint: what capguard keeps when vLLM runs the LLM.

With the ``vllm`` engine the LLM's weights live in vLLM's engine core; capguard only builds each prompt,
[prompt prefix | visual tokens | suffix] embeddings (``Captioner.sequence``), and decodes the ids that come
back (``Captioner.finish``). Both need the input embedding table and the tokenizer, not the transformer:
loading the whole ``AutoModelForCausalLM`` as well held a second full copy of the LLM (a 7B LLM in bf16:
~14 GB twice). ``load_input_embeddings`` reads that one tensor from the safetensors (one file, or the
shard ``model.safetensors.index.json`` names) and wraps it in ``InputEmbeddingsLLM``, which answers
``get_input_embeddings()`` like the full model and refuses ``forward`` / ``generate`` with a clear error.

The tensor's checkpoint key is not hard-coded (``model.embed_tokens.weight`` is Llama's; GPT-2 says
``transformer.wte.weight``): the config builds the model on the meta device (no memory), and the name of
the parameter ``get_input_embeddings()`` returns is the key. A checkpoint with tied embeddings may store the
shared tensor under the LM head's name only; a base-model checkpoint drops the ``model.`` prefix: both are
tried, and a shape that does not match the config fails.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from capguard.models.config import CheckpointError

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"


def load_llm_tokenizer(path: Path):
    """The LLM directory's AutoTokenizer, padding on the left (generation continues from aligned last positions)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    tokenizer.padding_side = "left"
    return tokenizer


def meta_model(config) -> nn.Module:
    """The causal LM of ``config`` on the meta device: its parameter names and shapes, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def embedding_keys(model: nn.Module) -> list[str]:
    """Checkpoint keys that may hold ``model``'s input embedding table, best first: the names of the parameter
    ``get_input_embeddings()`` returns (every name it goes by when tied to the LM head, e.g. ``lm_head.weight``),
    each also without the base model's prefix (what a base-model checkpoint, AutoModel.save_pretrained, stores).

        LlamaForCausalLM, tied -> ["model.embed_tokens.weight", "embed_tokens.weight", "lm_head.weight"]
    """
    weight = model.get_input_embeddings().weight
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is weight]
    if not names:
        raise CheckpointError(f"{type(model).__name__}: its input embeddings are not one of its parameters")
    prefix = getattr(model, "base_model_prefix", "")
    keys = []
    for name in names:
        keys += [name, name.removeprefix(f"{prefix}.")] if prefix and name.startswith(f"{prefix}.") else [name]
    return list(dict.fromkeys(keys))


def _stored_keys(path: Path) -> dict[str, Path]:
    """{tensor key: safetensors file} of an LLM directory: the index's weight map when sharded, else the one file."""
    from safetensors import safe_open

    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{index}: not a safetensors index ({exc})") from exc
        return {key: path / name for key, name in weight_map.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"LLM directory {path} has neither model.safetensors nor {INDEX_NAME}: the vllm "
                              "engine reads the input embeddings from safetensors (use the hf engine otherwise)")
    with safe_open(str(single), framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


def read_input_embeddings(path: Path, model: nn.Module) -> torch.Tensor:
    """(V, D) input embedding table of the transformers LLM in ``path`` (``model``: its meta-device twin), as
    stored (the file's dtype), reading only that tensor (and, sharded, only its shard)."""
    from safetensors import SafetensorError, safe_open

    candidates, shape = embedding_keys(model), tuple(model.get_input_embeddings().weight.shape)
    stored = _stored_keys(path)
    key = next((k for k in candidates if k in stored), None)
    if key is None:
        raise CheckpointError(f"LLM weights in {path} have no input embeddings: none of {candidates} is stored")
    try:
        with safe_open(str(stored[key]), framework="pt") as f:
            weight = f.get_tensor(key)
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"cannot read {key} from {stored[key]}: {exc}") from exc
    if tuple(weight.shape) != shape:
        raise CheckpointError(f"{stored[key]}: {key} is {tuple(weight.shape)}, its config says {shape}")
    return weight


class InputEmbeddingsLLM(nn.Module):
    """Stands in for the causal LLM where only its input embeddings are needed (the vllm engine's captioner).

    ``get_input_embeddings()`` is the table ((V, D) ``nn.Embedding``) the full model would return, so
    ``Captioner.sequence`` / ``prompt_embeddings`` build the same prompts. Running the LLM here is an error:
    it runs in the engine core.
    """

    def __init__(self, embed_tokens: nn.Embedding, config, path: Path):
        super().__init__()
        self.embed_tokens, self.config, self.path = embed_tokens, config, Path(path)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def _refuse(self, what: str):
        raise RuntimeError(f"{what} of the LLM {self.path}: this captioner holds only the LLM's input embeddings "
                           "(the vllm engine runs the LLM in its engine core); load the checkpoint with "
                           "engine='hf' to run the HF model in this process")

    def forward(self, *args, **kwargs):
        self._refuse("forward")

    def generate(self, *args, **kwargs):
        self._refuse("generate")


def load_input_embeddings(path: Path, device: torch.device, dtype: torch.dtype, share: nn.Module | None = None,
                          load_full: Callable[[], nn.Module] | None = None) -> InputEmbeddingsLLM:
    """The LLM in ``path`` as its input embeddings only, on ``device`` in ``dtype``.

    ``share``: the embedding module of the same LLM already loaded in full (same device and dtype): reused,
    nothing is read. An architecture whose embedding module is more than a table (Gemma scales its output) is
    taken from the full model, ``load_full()``, which is then let go: correct prompts first, and the memory
    is only borrowed for the load.
    """
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise CheckpointError(f"LLM directory {path} has no config.json (a transformers model dir is expected)")
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        model = meta_model(config)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for bad or unknown configs
        raise CheckpointError(f"cannot build the LLM of {path} from its config: {exc}") from exc
    if share is None and type(model.get_input_embeddings()) is not nn.Embedding:
        if load_full is None:
            raise CheckpointError(f"{type(model).__name__} embeds with {type(model.get_input_embeddings()).__name__}, "
                                  "not a plain table: the full model is needed to build its input embeddings")
        log.warning("LLM %s: %s is not a plain embedding table; loading the full model once to take it", path,
                    type(model.get_input_embeddings()).__name__)
        share = load_full().get_input_embeddings()
    if share is None:
        weight = read_input_embeddings(path, model).to(device=device, dtype=dtype)   # (V, D)
        share = nn.Embedding.from_pretrained(weight, freeze=True)
        log.info("LLM %s: input embeddings only (%d x %d, %.1f MB); the LLM itself runs in the engine", path,
                 *weight.shape, weight.numel() * weight.element_size() / 1e6)
    return InputEmbeddingsLLM(share, config, path).eval()
