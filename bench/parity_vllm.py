"""Engine parity on the shipped stacks: vLLM's greedy captions against HF's one-by-one ones, and guard verdicts.

    .venv-vllm/bin/python bench/parity_vllm.py                       # demo + collapsed, 97 val videos, fp32
    .venv-vllm/bin/python bench/parity_vllm.py --limit 8 --json out.json

For each checkpoint: HF greedy generate one video at a time (the reference: HF's *batched* generate drifts
against itself) and vLLM with every request submitted at once; rows whose token ids differ are explained
with HF's top-2 logit gap at the first differing step (a tie within --eps: both are greedy answers to a
numerically tied step). The evaluation verdict (capguard evaluate's rules) of each engine's captions must
agree. Needs .venv-vllm (make install-vllm); prints one JSON line per checkpoint and exits 1 when a checkpoint
is under --min-equal or a difference is not a tie or the verdicts disagree.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_frames(manifest: Path, num_frames: int, max_side: int, limit: int | None) -> list:
    from capguard.models.video import VideoLimits, sample_frames

    rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = rows[:limit] if limit else rows
    return [sample_frames(manifest.parent / r["path"], num_frames, VideoLimits(), max_side=max_side).frames
            for r in rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", nargs="+", default=[str(ROOT / "checkpoints" / "demo"),
                                                            str(ROOT / "checkpoints" / "collapsed")])
    parser.add_argument("--videos", default=str(ROOT / "samples" / "val" / "val.jsonl"))
    parser.add_argument("--limit", type=int)
    parser.add_argument("--eps", type=float, default=1e-3, help="top-2 logit gap that counts as a tie (fp32)")
    parser.add_argument("--min-equal", type=float, default=95 / 97, help="share of rows that must be equal")
    parser.add_argument("--json", help="write the full results (captions included) here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("capguard").setLevel(logging.INFO)

    from capguard.models.engines.parity import compare_engines
    from capguard.models.stack import ComponentCache, load_stack

    cache = ComponentCache()
    ok, results = True, []
    frames = None
    for directory in args.checkpoints:
        if frames is None:   # the shipped stacks share their encoder, frame count and frame size
            first = load_stack(directory, device="cpu", cache=cache, engine="hf")
            frames = load_frames(Path(args.videos), first.config.num_frames, first.frame_side, args.limit)
        result = compare_engines(directory, frames, cache=cache, eps=args.eps)
        bad = [d for d in result["differences"] if not d.is_tie(args.eps)]
        agree = result["verdict"]["hf"]["status"] == result["verdict"]["vllm"]["status"]
        ok &= result["equal"] >= args.min_equal * result["n"] and not bad and agree
        summary = {"checkpoint": result["checkpoint"], "dtype": result["dtype"],
                   "equal": f"{result['equal']}/{result['n']}", "ties": result["ties"],
                   "differences": [vars(d) for d in result["differences"]],
                   "verdict_hf": result["verdict"]["hf"], "verdict_vllm": result["verdict"]["vllm"],
                   "seconds": {k: round(v, 2) for k, v in result["seconds"].items()}}
        print(json.dumps(summary, ensure_ascii=False), flush=True)
        results.append(summary | {"captions": result["captions"]})
    if args.json:
        Path(args.json).write_text(json.dumps(results, ensure_ascii=False, indent=1), encoding="utf-8")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
