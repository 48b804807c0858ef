"""How far the model's work is from this CPU's limit: the stages' GFLOP/s against a measured matmul peak.

    .venv/bin/python bench/bench_cpu_limits.py                   # demo stack, batch 1 and 8, 1 torch thread
    .venv/bin/python bench/bench_cpu_limits.py --threads 2 --batches 8

1. Peak: the best of float32 ``torch.mm`` on square matrices (512-2048) with the same torch threads: what
   this core does at best on the kind of work the model does (no GPU-style datasheet peak to trust on a
   shared vCPU).
2. The stack's stages, each timed alone (median of ``--repeats``) on ``--batch`` videos of samples/val:
   vision tower (FLOPs: every weight matrix per token plus attention, bench/gpu_bench.py's count), the
   LLM prefill over the whole prompt (``logits_to_keep=1``, as ``generate`` does; same count), and one
   decode step (``generate`` minus prefill, per new token; its FLOPs: the linear weights once per row).
3. Printed per stage: ms, GFLOP, GFLOP/s and the share of the peak; the decode steps' share is what
   batching can still win (their time is Python and small-matrix overhead, not arithmetic).

Both sides of every ratio are measured in this run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from gpu_bench import prefill_flops, vision_flops  # noqa: E402  (one FLOP count for CPU and GPU)


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() over `repeats` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def matmul_peak(repeats: int) -> tuple[float, int]:
    """(best float32 GFLOP/s of torch.mm, the size that gave it)."""
    best = (0.0, 0)
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        seconds = timed(lambda a=a, b=b: torch.mm(a, b), repeats)
        best = max(best, (2 * n ** 3 / seconds / 1e9, n))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=REPO / "checkpoints" / "demo")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from bench_server import DEFAULT_MANIFEST, manifest_videos

    from capguard.models.stack import load_stack
    from capguard.models.video import sample_frames

    peak, size = matmul_peak(args.repeats)
    print(f"torch {torch.__version__}, {args.threads} thread(s): float32 matmul peak {peak:.1f} GFLOP/s "
          f"({size}x{size})")
    stack = load_stack(args.checkpoint, device="cpu")
    paths = manifest_videos(DEFAULT_MANIFEST, max(args.batches))
    videos = [sample_frames(p, stack.config.num_frames, max_side=stack.frame_side).frames for p in paths]
    print(f"{'batch':>5} {'stage':<14} {'ms':>8} {'GFLOP':>8} {'GFLOP/s':>8} {'of peak':>8}")
    with torch.inference_mode():
        for batch in args.batches:
            stages, generate_s, steps = measure(stack, videos[:batch], args.repeats)
            for name, seconds, flops in stages:
                rate = flops / seconds / 1e9
                print(f"{batch:>5} {name:<14} {1000 * seconds:>8.2f} {flops / 1e9:>8.3f} {rate:>8.1f} "
                      f"{rate / peak:>8.0%}")
            prefill_s = stages[1][1]
            print(f"{batch:>5} {'generate':<14} {1000 * generate_s:>8.2f}   ({steps} tokens: prefill + "
                  f"{steps - 1} steps; steps are {(generate_s - prefill_s) / generate_s:.0%} of generate)")


def measure(stack, frames: list, repeats: int) -> tuple[list[tuple[str, float, float]], float, int]:
    """([(stage, seconds, FLOPs)] for vision tower, prefill and one decode step; generate seconds; tokens)."""
    cap, llm = stack.captioner, stack.captioner.llm
    batch, counts = len(frames), [len(v) for v in frames]
    tower = cap.encoder.visual
    frame_tokens = cap.encoder.tokens_per_frame + (getattr(tower, "class_embedding", None) is not None)
    pixels = stack.pixels(frames, cap.encoder.preprocess)
    visual = cap.project(cap.visual_tokens(pixels, counts))
    embeds, mask, positions, _ = cap.build_inputs(visual)                  # (B, S, D)
    gen = stack.config.generation
    steps = max(len(g.token_ids) for g in cap.generate(visual, gen)) + 1   # new tokens, EOS included
    vision_s = timed(lambda: cap.encoder(pixels), repeats)
    prefill_s = timed(lambda: llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                  logits_to_keep=1), repeats)
    generate_s = timed(lambda: cap.generate(visual, gen), repeats)
    linear = sum(m.weight.numel() for m in llm.model.layers.modules() if isinstance(m, torch.nn.Linear))
    step_flops = batch * 2 * (linear + llm.config.hidden_size * llm.config.vocab_size)
    return ([("vision tower", vision_s, sum(counts) * vision_flops(tower, frame_tokens)),
             ("LLM prefill", prefill_s, prefill_flops(llm, batch, embeds.shape[1])),
             ("decode step", (generate_s - prefill_s) / max(1, steps - 1), step_flops)], generate_s, steps)

if __name__ == "__main__":
    main()
