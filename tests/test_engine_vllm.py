"""The vllm engine (make test-vllm, in .venv-vllm and a loopback-only network namespace; skipped elsewhere).

One engine start per checkpoint for the module (~11 s each on a CPU). Parity is the acceptance of issue 14:
greedy fp32 captions of the shipped stacks on the 97 val videos equal HF's one-by-one captions on >= 95/97,
every difference is a top-2 logit tie, and the guard verdicts agree.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parent.parent
EPS = 1e-3   # fp32 top-2 logit gap that counts as a tie


@pytest.fixture(scope="module")
def cache():
    from capguard.models.stack import ComponentCache

    return ComponentCache()


@pytest.fixture(scope="module")
def frames(cache):
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    from parity_vllm import load_frames

    from capguard.models.stack import load_stack

    stack = load_stack(ROOT / "checkpoints" / "demo", device="cpu", cache=cache, engine="hf")
    return load_frames(ROOT / "samples" / "val" / "val.jsonl", stack.config.num_frames, stack.frame_side, None)


def test_usage_stats_stay_off_and_kv_space_is_bounded(cache):
    from capguard.models.stack import load_stack

    stack = load_stack(ROOT / "checkpoints" / "demo", device="cpu", cache=cache, engine="vllm")
    assert stack.engine_name == "vllm"
    assert os.environ["VLLM_NO_USAGE_STATS"] == "1" and os.environ["DO_NOT_TRACK"] == "1"
    assert float(os.environ["VLLM_CPU_KVCACHE_SPACE"]) <= 4
    config = stack.engine.core.llm.vllm_config
    assert config.model_config.enable_prompt_embeds
    assert not config.cache_config.enable_prefix_caching


def test_engine_core_runs_with_tcmalloc_where_the_system_has_it(cache):
    """The engine core is a spawned process; the allocator vLLM's CPU guide asks for is mapped in it."""
    from capguard.models.engines.vllm_engine import tcmalloc_library
    from capguard.models.stack import load_stack

    if tcmalloc_library() is None:
        pytest.skip("no tcmalloc on this system (make install-vllm installs libtcmalloc-minimal4)")
    load_stack(ROOT / "checkpoints" / "demo", device="cpu", cache=cache, engine="vllm")
    cores = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _comm(p).startswith("VLLM::EngineCor")
             and _parent(p) == os.getpid()]
    assert cores, "no engine-core child process found"
    assert all("libtcmalloc" in (p / "maps").read_text() for p in cores)
    assert "libtcmalloc" not in os.environ.get("LD_PRELOAD", "")   # only the engine core's environment had it


def _comm(proc: Path) -> str:
    try:
        return (proc / "comm").read_text()
    except OSError:
        return ""


def _parent(proc: Path) -> int:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def test_vllm_stack_keeps_only_the_llms_input_embeddings(cache):
    """vLLM holds the LLM; the capguard process keeps its (V, D) input embedding table and tokenizer, not a
    second full model (issue 14: a 7B LLM twice on one GPU). Runs before any hf stack fills the cache."""
    from capguard.models.llm_embeddings import InputEmbeddingsLLM
    from capguard.models.stack import compile_llm, load_stack

    stack = load_stack(ROOT / "checkpoints" / "demo", device="cpu", cache=cache, engine="vllm")
    llm = stack.captioner.llm
    vocab, dim = llm.config.vocab_size, llm.config.hidden_size
    assert isinstance(llm, InputEmbeddingsLLM)
    assert sum(p.numel() for p in llm.parameters()) == vocab * dim      # the demo LLM has ~24x as many
    assert not [key for key in cache.llms if len(key) == 3]             # no (path, device, dtype): no full LLM
    assert compile_llm(stack) == 0.0                                     # vLLM compiles its own; nothing here
    with pytest.raises(RuntimeError, match="engine='hf'"):
        stack.captioner.llm.generate()


@pytest.mark.parametrize("checkpoint", ["demo", "collapsed"])
def test_parity_with_hf_one_by_one_and_same_verdict(checkpoint, cache, frames):
    from capguard.models.engines.parity import compare_engines

    result = compare_engines(ROOT / "checkpoints" / checkpoint, frames, cache=cache, eps=EPS)
    assert result["dtype"] == "float32" and result["n"] == 97
    assert result["equal"] >= 95, result["differences"]
    assert all(d.is_tie(EPS) for d in result["differences"]), result["differences"]
    assert result["verdict"]["hf"]["status"] == result["verdict"]["vllm"]["status"]
    assert result["verdict"]["vllm"]["status"] == ("ok" if checkpoint == "demo" else "collapsed")


def test_requests_leave_when_done_and_abort(cache, frames):
    """generate_one from another event loop: a 2-token request finishes before 48-token ones submitted
    with it; a cancelled request is aborted in vLLM and the engine keeps serving."""
    from capguard.models.stack import load_stack

    stack = load_stack(ROOT / "checkpoints" / "demo", device="cpu", cache=cache, engine="vllm")
    cap, engine, gen = stack.captioner, stack.engine, stack.config.generation
    with torch.inference_mode():
        pixels = stack.pixels(frames[:3], cap.encoder.preprocess)
        visual = cap.project(cap.visual_tokens(pixels, [len(f) for f in frames[:3]]))
    prompts = [cap.sequence(v) for v in visual]                       # (L, D_llm) each
    hf = load_stack(ROOT / "checkpoints" / "demo", device="cpu", cache=cache, engine="hf")
    reference = hf.captioner.generate(visual[:1], gen)[0]   # the vllm stack's captioner holds no HF LLM to run

    async def scenario():
        done: list[str] = []

        async def one(i: int, limit: int, rid: str):
            out = await engine.generate_one(prompts[i], gen, rid, max_new_tokens=limit)
            done.append(rid)
            return out

        tasks = [asyncio.create_task(one(0, 48, "long-a")), asyncio.create_task(one(1, 2, "short")),
                 asyncio.create_task(one(2, 48, "long-b"))]
        doomed = asyncio.create_task(one(2, 48, "doomed"))
        await asyncio.sleep(0)
        doomed.cancel()
        results = await asyncio.gather(*tasks)
        with pytest.raises(asyncio.CancelledError):
            await doomed
        await engine.abort("never-submitted")
        return done, results

    started = time.perf_counter()
    done, results = asyncio.run(scenario())
    assert time.perf_counter() - started < 60
    assert done[0] == "short" and "doomed" not in done
    assert results[1].num_tokens <= 2 and results[0] == reference
    assert stack.engine.generate(visual[:1], gen)[0] == reference   # still serving after the abort


def test_a_script_holding_a_vllm_stack_exits_clean(tmp_path):
    """A user's script that keeps a vllm stack in a global to the end prints its caption and exits 0 with nothing
    on stderr that reads like a failure: the engine core is shut down once (AsyncLLM's own __del__ ran again
    at interpreter exit, after vLLM's module globals were gone, and printed "Exception ignored ... TypeError")."""
    import subprocess
    import sys

    script = tmp_path / "caption_one.py"
    script.write_text(
        "import numpy as np\n"
        "from capguard.models.stack import load_stack\n"
        "if __name__ == '__main__':\n"
        f"    stack = load_stack({str(ROOT / 'checkpoints' / 'demo')!r}, device='cpu', engine='vllm')\n"
        "    frames = np.random.default_rng(0).integers(0, 255, (8, 64, 64, 3), dtype=np.uint8)\n"
        "    outputs, _ = stack.caption([frames])\n"
        "    print('caption:', outputs[0].caption)\n", encoding="utf-8")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "caption: " in done.stdout, done.stdout
    for failure in ("Traceback", "Exception ignored"):
        assert failure not in done.stderr, done.stderr[-3000:]
