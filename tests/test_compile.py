"""The opt-in compiled LLM (capguard.models.stack.compile_llm, CAPGUARD_COMPILE): the eager tokens, no compile after warm-up."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from capguard.models.stack import compile_llm, load_stack
from capguard.models.video import sample_frames

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "checkpoints" / "demo"
VAL = REPO / "samples" / "val"


@pytest.mark.slow
@pytest.mark.skipif(not (DEMO / "capguard.json").is_file(), reason="needs the shipped demo checkpoint")
def test_compiled_llm_gives_the_eager_tokens_for_any_batch_without_compiling_again():
    import torch._dynamo

    paths = sorted(VAL.glob("*.mp4"))[:5]
    eager = load_stack(DEMO, device="cpu")       # each load_stack has its own cache: two separate LLMs
    compiled = load_stack(DEMO, device="cpu")
    frames = [sample_frames(p, 8, max_side=eager.frame_side).frames for p in paths]
    frames[3] = frames[3][:5]                    # a shorter video: left padding, another prompt length
    batches = [frames[:1], frames[1:5], frames[2:4]]

    def run():   # on a worker thread, like the server's model thread
        seconds = compile_llm(compiled)
        torch._dynamo.utils.counters.clear()
        outputs = [compiled.caption(b)[0] for b in batches]
        return seconds, outputs, dict(torch._dynamo.utils.counters["stats"])

    with ThreadPoolExecutor(1) as thread:
        seconds, outputs, stats = thread.submit(run).result()
        references = [thread.submit(lambda b=b: eager.caption(b)[0]).result() for b in batches]
    assert seconds > 0 and compiled.captioner.static_cache and not eager.captioner.static_cache
    for got, want in zip(outputs, references, strict=True):
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
        np.testing.assert_allclose([o.score for o in got], [o.score for o in want], atol=1e-5)
    # batches of 1, 4 and 2 with two prompt lengths after the warm-up: nothing was compiled on a request
    assert stats.get("unique_graphs", 0) == 0, stats


@pytest.mark.slow   # loads the demo stack and tries torch.compile: 13 s on 2 busy cores
@pytest.mark.skipif(not (DEMO / "capguard.json").is_file(), reason="needs the shipped demo checkpoint")
def test_a_failed_compile_leaves_the_llm_eager_and_serving(monkeypatch, caplog):
    import capguard.models.stack

    stack = load_stack(DEMO, device="cpu")
    llm = stack.captioner.llm

    def no_compiler(stack):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr(capguard.models.stack, "_warm_up", no_compiler)
    assert compile_llm(stack) == 0.0
    assert "forward" not in llm.__dict__ and not stack.captioner.static_cache   # the class's own forward again
    assert "compiling the LLM failed (RuntimeError: InvalidCxxCompiler" in caplog.text
    frames = sample_frames(sorted(VAL.glob("*.mp4"))[0], 8, max_side=stack.frame_side).frames
    assert stack.caption([frames])[0][0].caption
