"""The engine boundary (capguard.models.engines) with the hf engine: choice, per-request API, abort, CLI flag.

The vllm engine has its own module (tests/test_engine_vllm.py, `make test-vllm`), run in .venv-vllm.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json

import pytest
import torch

from capguard.models.config import GenerationConfig
from capguard.models.engines import Engine, EngineError, resolve_engine
from capguard.models.engines.parity import divergence, first_difference

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.fixture(scope="module")
def stack(checkpoints_root):
    from capguard.models.stack import load_stack

    return load_stack(checkpoints_root / "demo", device="cpu", with_scorer=False, engine="hf")


def _visual(stack, seed: int, rows: int = 6) -> torch.Tensor:
    dim = stack.captioner.llm.get_input_embeddings().embedding_dim
    return torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed))   # (Q, D_llm)


def test_engine_names_resolve(checkpoints_root, monkeypatch):
    llm_dir = next(checkpoints_root.rglob("llm/config.json")).parent
    assert resolve_engine("hf", llm_dir) == "hf"
    monkeypatch.setenv("CAPGUARD_ENGINE", "hf")
    assert resolve_engine(None, llm_dir) == "hf"
    monkeypatch.setenv("CAPGUARD_ENGINE", "tensorrt")
    with pytest.raises(EngineError, match="unknown engine 'tensorrt'"):
        resolve_engine(None, llm_dir)
    if not HAS_VLLM:
        assert resolve_engine("auto", llm_dir) == "hf"
        with pytest.raises(EngineError, match="vllm is not installed"):
            resolve_engine("vllm", llm_dir)


def test_hf_engine_one_request_equals_batch_of_one(stack):
    engine, cap = stack.engine, stack.captioner
    assert isinstance(engine, Engine) and stack.engine_name == "hf"
    gen = GenerationConfig(max_new_tokens=12)
    for seed in range(3):
        vis = _visual(stack, seed)
        want = cap.generate([vis], gen)[0]
        got = asyncio.run(engine.generate_one(cap.sequence(vis), gen, f"r{seed}"))
        assert got == want
        short = asyncio.run(engine.generate_one(cap.sequence(vis), gen, f"s{seed}", max_new_tokens=2))
        assert short.token_ids == want.token_ids[:2]


def test_hf_engine_abort_stops_a_request_and_keeps_serving(stack):
    engine, cap = stack.engine, stack.captioner
    gen = GenerationConfig(max_new_tokens=12)
    embeds = cap.sequence(_visual(stack, 0))

    async def scenario():
        engine._lock.acquire()           # the model is busy: the request waits in its worker thread
        try:
            task = asyncio.create_task(engine.generate_one(embeds, gen, "gone"))
            await asyncio.sleep(0.05)
            await engine.abort("gone")
            await engine.abort("never-submitted")   # unknown ids are ignored
        finally:
            engine._lock.release()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await engine.generate_one(embeds, gen, "next")

    assert asyncio.run(scenario()) == cap.generate([_visual(stack, 0)], gen)[0]
    assert not engine._pending and not engine._aborted


def test_divergence_names_the_first_differing_step(stack):
    assert first_difference([1, 2, 3], [1, 2, 4]) == 2
    assert first_difference([1, 2], [1, 2, 3]) == 2
    assert first_difference([1, 2], [1, 2]) is None
    cap, vis = stack.captioner, _visual(stack, 1)
    ref = cap.generate([vis], GenerationConfig(max_new_tokens=6))[0]
    assert divergence(cap, vis, ref, ref) is None
    other = type(ref)(text="", token_ids=ref.token_ids[:1] + [(ref.token_ids[1] + 1) % 50 + 3 if len(ref.token_ids) > 1
                                                              else cap.eos_id])
    found = divergence(cap, vis, ref, other)
    assert found is not None and found.step == 1 and found.gap >= 0
    assert found.top2[0] == (ref.token_ids + [cap.eos_id])[1]   # HF's own greedy choice is its top-1


@pytest.mark.skipif(HAS_VLLM, reason="checks the error when vllm is missing")
def test_cli_engine_vllm_without_vllm_exits_2(checkpoints_root, video_files, capsys, monkeypatch):
    from capguard.server.cli import main

    monkeypatch.setenv("CAPGUARD_ENGINE", "auto")   # --engine sets it for the process; restored afterwards

    assert main(["caption", "--engine", "vllm", "--no-score", "--checkpoint", str(checkpoints_root / "demo"),
                 str(video_files[0])]) == 2
    assert "vllm is not installed" in capsys.readouterr().err


def test_cli_engine_hf_reports_its_engine(checkpoints_root, video_files, capsys, monkeypatch):
    from capguard.server.cli import main

    monkeypatch.setenv("CAPGUARD_ENGINE", "auto")   # --engine sets it for the process; restored afterwards
    assert main(["caption", "--engine", "hf", "--no-score", "--max-new-tokens", "4", "--checkpoint",
                 str(checkpoints_root / "demo"), str(video_files[0])]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["engine"] == "hf"


def test_qwen2_shaped_preset_builds_what_it_names():
    """The realistic preset's knobs (Qwen2 architecture, grouped-query attention, a padded vocabulary) at toy size."""
    from capguard.models.components import PRESETS, TinySizes, build_llm, train_tokenizer

    real = PRESETS["siglip-b16-qwen2-0.5b"]
    assert (real.llm_arch, real.llm_hidden, real.llm_layers, real.llm_kv_heads, real.image_size) == \
        ("qwen2", 896, 24, 2, 224)
    tokenizer = train_tokenizer(["a small building"], 300)
    llm = build_llm(tokenizer, TinySizes(llm_arch="qwen2", llm_hidden=32, llm_heads=4, llm_kv_heads=2,
                                         llm_intermediate=48, llm_vocab=1000))
    assert type(llm).__name__ == "Qwen2ForCausalLM"
    assert llm.config.vocab_size == 1000 and llm.config.num_key_value_heads == 2
    assert llm.config.intermediate_size == 48


def test_vllm_engine_core_gets_tcmalloc_preloaded(monkeypatch, tmp_path):
    """vLLM's CPU guide asks for tcmalloc in LD_PRELOAD: the engine core gets the system's (auto), a given file,
    or none (off); what LD_PRELOAD held stays, after it; a bad setting names the variable."""
    from capguard.models.engines.vllm_engine import VLLMOptions, preload_env

    library = tmp_path / "libtcmalloc_minimal.so.4"
    library.write_bytes(b"")
    monkeypatch.setenv("LD_PRELOAD", "/opt/other.so")
    assert preload_env(str(library)) == {"LD_PRELOAD": f"{library}:/opt/other.so"}
    assert preload_env("off") == {}
    monkeypatch.setenv("LD_PRELOAD", f"{library}")
    assert preload_env(str(library)) == {}                  # already there: not twice
    monkeypatch.delenv("LD_PRELOAD")
    assert VLLMOptions.from_env().tcmalloc == "auto"
    monkeypatch.setenv("CAPGUARD_VLLM_TCMALLOC", str(library))
    assert VLLMOptions.from_env().tcmalloc == str(library)
    monkeypatch.setenv("CAPGUARD_VLLM_TCMALLOC", str(tmp_path / "missing.so"))
    with pytest.raises(EngineError, match="CAPGUARD_VLLM_TCMALLOC"):
        VLLMOptions.from_env()


def test_vllm_options_from_the_environment(monkeypatch):
    """The vllm engine's settings parse without vLLM installed; a bad value names the variable."""
    from capguard.models.engines.vllm_engine import VLLMOptions

    assert VLLMOptions.from_env().executor is None   # auto: the model runs inside the engine core on a CPU
    # the running batch: below a CPU server's clients (they stagger instead of moving in waves), wide on a GPU
    assert (VLLMOptions.from_env().running_seqs(on_gpu=False), VLLMOptions.from_env().running_seqs(on_gpu=True)) == (12, 32)
    monkeypatch.setenv("CAPGUARD_VLLM_MAX_NUM_SEQS", "20")
    assert VLLMOptions.from_env().running_seqs(on_gpu=False) == 20
    monkeypatch.delenv("CAPGUARD_VLLM_MAX_NUM_SEQS")
    monkeypatch.setenv("CAPGUARD_VLLM_EXECUTOR", "MP")
    monkeypatch.setenv("CAPGUARD_VLLM_CPU_THREADS", "3")
    options = VLLMOptions.from_env()
    assert (options.executor, options.cpu_threads) == ("mp", 3)
    for name, value in [("CAPGUARD_VLLM_EXECUTOR", "ray"), ("CAPGUARD_VLLM_CPU_THREADS", "0"),
                        ("CAPGUARD_VLLM_CPU_THREADS", "many"), ("CAPGUARD_VLLM_MAX_NUM_SEQS", "0")]:
        monkeypatch.setenv(name, value)
        with pytest.raises(EngineError, match=name):
            VLLMOptions.from_env()
        monkeypatch.delenv(name)
