"""LLM engines side by side: per-video generate cost of HF (batch 1 loop, batch 8) and vLLM (all at once).

    .venv-vllm/bin/python bench/bench_engines.py                               # demo stack, 32 val videos
    .venv-vllm/bin/python bench/bench_engines.py --checkpoint out/real --videos 4 --new-tokens 32
    .venv-vllm/bin/python bench/bench_engines.py --engines hf                   # the main venv: no vLLM

The visual tokens of every video are computed once (encoder + projector, shared by all engines); then each
engine turns the same (Q, D_llm) blocks into captions and only that is timed, ``--rounds`` times (the best
round counts; an untimed warm-up call first). ``same`` counts rows whose tokens equal the HF batch-1 ones
(greedy fp32: differences are top-2 ties, bench/parity_vllm.py). ``--new-tokens`` forces every caption to
exactly that many tokens (EOS ignored via min_new_tokens / vLLM's min_tokens, so random weights do not stop
early) and makes the engines' work identical; without it captions stop at EOS.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from capguard.models.config import GenerationConfig

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class ForcedLength(GenerationConfig):
    """Generation defaults + a floor on the length: HF generate takes it as min_new_tokens, the vllm engine
    as min_tokens, so both generate exactly max_new_tokens when the two are equal."""
    min_new_tokens: int = 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "demo"))
    parser.add_argument("--manifest", default=str(ROOT / "samples" / "val" / "val.jsonl"))
    parser.add_argument("--videos", type=int, default=32)
    parser.add_argument("--num-frames", type=int, help="default: the checkpoint's")
    parser.add_argument("--new-tokens", type=int, help="exactly this many tokens per caption (EOS ignored)")
    parser.add_argument("--engines", nargs="+", default=["hf", "vllm"], choices=["hf", "vllm"])
    parser.add_argument("--hf-batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("capguard").setLevel(logging.INFO)

    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from parity_vllm import load_frames

    from capguard.models.stack import ComponentCache, load_stack

    torch.set_num_threads(max(1, torch.get_num_threads()))
    cache = ComponentCache()
    hf = load_stack(args.checkpoint, device="cpu", cache=cache, with_scorer=False, engine="hf")
    cap = hf.captioner
    frames = load_frames(Path(args.manifest), args.num_frames or hf.config.num_frames, hf.frame_side, args.videos)
    gen = hf.config.generation
    if args.new_tokens:
        gen = ForcedLength(**asdict(gen) | {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens})
    with torch.inference_mode():
        visual = []
        for f in frames:   # (Q, D_llm) per video
            visual += cap.project(cap.visual_tokens(hf.pixels([f], cap.encoder.preprocess), [len(f)]))
    n = len(visual)

    def hf_batches(size: int):
        out = []
        for i in range(0, n, size):
            out += cap.generate(visual[i:i + size], gen)
        return out

    runs = {"hf_b1": lambda: hf_batches(1), f"hf_b{args.hf_batch}": lambda: hf_batches(args.hf_batch)}
    if "vllm" in args.engines:
        vl = load_stack(args.checkpoint, device="cpu", cache=cache, with_scorer=False, engine="vllm")
        runs["vllm_all"] = lambda: vl.engine.generate(visual, gen)
    if "hf" not in args.engines:
        runs = {k: v for k, v in runs.items() if k.startswith("vllm") or k == "hf_b1"}
    reference, rows = None, {}
    for name, run in runs.items():
        run() if name != "hf_b1" else None          # warm-up (hf_b1's first round doubles as its reference)
        best, out = float("inf"), None
        for _ in range(args.rounds):
            started = time.perf_counter()
            out = run()
            best = min(best, time.perf_counter() - started)
        reference = reference or out
        tokens = sum(o.num_tokens for o in out)
        rows[name] = {"ms_per_video": round(1000 * best / n, 2), "tokens_per_video": round(tokens / n, 1),
                      "same_as_hf_b1": sum(a.token_ids == b.token_ids for a, b in zip(reference, out, strict=True))}
    base = rows["hf_b1"]["ms_per_video"]
    for row in rows.values():
        row["speedup_vs_hf_b1"] = round(base / row["ms_per_video"], 2)
    print(json.dumps({"checkpoint": str(args.checkpoint), "videos": n, "visual_tokens": int(visual[0].shape[0]),
                      "new_tokens": args.new_tokens or "eos", "threads": torch.get_num_threads(),
                      "engines": rows}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
