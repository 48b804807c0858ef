"""The LLM's input embeddings alone (capguard.models.llm_embeddings): what a vllm-engine stack keeps of its LLM.

The embedding-only table must give exactly the prompt embeddings the full HF model gives (prompts go to vLLM
as embeddings), for the shipped demo LLM and for tiny random transformers LLMs saved sharded, tied and
untied, whose key is not Llama's. The vllm stack itself is tested in tests/test_engine_vllm.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from capguard.models.config import CheckpointError
from capguard.models.llm_embeddings import INDEX_NAME, InputEmbeddingsLLM, load_input_embeddings
from capguard.models.stack import ComponentCache, load_stack

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


def _tiny_llm(out: Path, arch: str, tied: bool) -> Path:
    """A random transformers causal LM saved in several safetensors shards (+ model.safetensors.index.json)."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    torch.manual_seed(0)
    if arch == "gpt2":      # its table is transformer.wte.weight, not model.embed_tokens.weight
        config = GPT2Config(vocab_size=301, n_embd=32, n_layer=1, n_head=2, n_positions=64, tie_word_embeddings=tied)
    else:
        config = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch](
            vocab_size=301, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_config(config)
    if not tied:   # random init may start the two tables equal; make sure which one is read shows
        with torch.no_grad():
            model.get_output_embeddings().weight.normal_()
    model.save_pretrained(str(out), max_shard_size="20KB")
    return out


@pytest.mark.parametrize(("arch", "tied"), [("llama", True), ("llama", False), ("qwen2", False), ("gpt2", True)])
def test_sharded_tied_and_untied_tables_equal_the_full_models(tmp_path, arch, tied):
    from transformers import AutoModelForCausalLM

    path = _tiny_llm(tmp_path / "llm", arch, tied)
    shards = set(json.loads((path / INDEX_NAME).read_text())["weight_map"].values())
    assert len(shards) > 1
    full = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    only = load_input_embeddings(path, CPU, torch.float32)
    ids = torch.arange(full.config.vocab_size)
    assert torch.equal(only.get_input_embeddings()(ids), full.get_input_embeddings()(ids))   # (V, D)
    if not tied:
        assert not torch.equal(only.get_input_embeddings().weight, full.get_output_embeddings().weight)
    assert sum(p.numel() for p in only.parameters()) == full.get_input_embeddings().weight.numel()


def test_demo_prompt_embeddings_equal_the_full_llms():
    """The shipped demo stack: [prompt | visual | suffix] from the embedding-only captioner is the hf one's, bit
    for bit, and running the LLM through it is refused with a message that says what to do."""
    from capguard.models.captioner import Captioner

    stack = load_stack(ROOT / "checkpoints" / "demo", device="cpu", with_scorer=False, engine="hf")
    cap = stack.captioner
    only = load_input_embeddings(Path(cap.llm.name_or_path).resolve(), CPU, stack.dtype)
    light = Captioner(cap.encoder, cap.projector, only, cap.tokenizer, stack.config.prompt)
    visual = torch.randn(24, only.get_input_embeddings().embedding_dim, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(light.sequence(visual), cap.sequence(visual))                 # (P + 24 + S, D)
        with pytest.raises(RuntimeError, match="only the LLM's input embeddings.*engine='hf'"):
            light.generate([visual], stack.config.generation)
    assert sum(p.numel() for p in only.parameters()) < sum(p.numel() for p in cap.llm.parameters()) / 10


def test_cache_shares_the_table_of_a_loaded_full_llm():
    cache, path = ComponentCache(), (ROOT / "checkpoints" / "demo" / "llm").resolve()
    full, tokenizer = cache.llm(path, CPU, torch.float32)
    only, only_tokenizer = cache.input_embeddings(path, CPU, torch.float32)
    assert isinstance(only, InputEmbeddingsLLM) and only.get_input_embeddings() is full.get_input_embeddings()
    assert only_tokenizer is tokenizer
    alone, _ = ComponentCache().input_embeddings(path, CPU, torch.float32)
    assert alone.get_input_embeddings() is not full.get_input_embeddings()
    assert torch.equal(alone.get_input_embeddings().weight, full.get_input_embeddings().weight)


def test_missing_or_misshapen_table_is_a_checkpoint_error(tmp_path):
    from safetensors.torch import save_file

    path = _tiny_llm(tmp_path / "llm", "llama", tied=True)
    for shard in path.glob("*.safetensors"):
        shard.unlink()
    (path / INDEX_NAME).unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors"):
        load_input_embeddings(path, CPU, torch.float32)
    save_file({"model.norm.weight": torch.ones(32)}, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="no input embeddings: none of .*model.embed_tokens.weight"):
        load_input_embeddings(path, CPU, torch.float32)
    save_file({"model.embed_tokens.weight": torch.ones(300, 32)}, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"is \(300, 32\), its config says \(301, 32\)"):
        load_input_embeddings(path, CPU, torch.float32)
