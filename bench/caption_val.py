"""Caption the shipped val videos with a checkpoint, greedy and sampled, and save the rows as JSONL fixtures.

The guard's tests and bench/bench_semantic.py judge recorded model output instead of re-generating it: one
row per (pass, video) with the caption, its token count, SigLIP score and the scorer's text embedding; the
video embeddings (the same scorer for every shipped checkpoint) go to one file per checkpoint.

    PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python bench/caption_val.py --checkpoint checkpoints/demo \\
        --out tests/data/captions-demo.jsonl --sampled-passes 3

Pass 0 is greedy (the checkpoint's own generation config); passes 1..k are do_sample=True, temperature=1.0,
top_p=1.0, seeded per (pass, video) with torch.manual_seed(1000 * pass + index), one video per call, so a
row does not depend on its batch neighbours and any row can be regenerated alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from capguard.models.stack import load_stack
from capguard.models.video import VideoLimits, sample_frames

log = logging.getLogger("caption_val")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--videos", default="samples/val/val.jsonl")
    parser.add_argument("--out", required=True, help="captions JSONL; video embeddings go to OUT's stem + -video.jsonl")
    parser.add_argument("--sampled-passes", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)

    stack = load_stack(args.checkpoint, device="cpu")
    manifest = Path(args.videos)
    items = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()][:args.limit]
    frames = [sample_frames(manifest.parent / it["path"], stack.config.num_frames, VideoLimits(),
                            max_side=stack.frame_side).frames for it in items]
    greedy = stack.config.generation
    sampled = greedy.merged(do_sample=True, temperature=args.temperature, top_p=1.0)
    out = Path(args.out)
    video_rows, rows = {}, []
    started = time.perf_counter()
    for p in range(args.sampled_passes + 1):
        gen = greedy if p == 0 else sampled
        for i, (item, video) in enumerate(zip(items, frames, strict=True)):
            torch.manual_seed(1000 * p + i)
            (o,), _ = stack.caption([video], generation=gen)
            rows.append({"video": item["id"], "pass": p, "do_sample": gen.do_sample,
                         "temperature": gen.temperature if gen.do_sample else None,
                         "seed": 1000 * p + i if gen.do_sample else None, "caption": o.caption,
                         "num_tokens": o.num_tokens, "max_new_tokens": gen.max_new_tokens,
                         "siglip": round(o.score, 5), "text_emb": np.round(o.text_emb.astype(np.float64), 5).tolist()})
            video_rows[item["id"]] = np.round(o.video_emb.astype(np.float64), 5).tolist()
        log.info("pass %d done (%.0f s)", p, time.perf_counter() - started)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    video_out = out.with_name(out.stem + "-video.jsonl")
    video_out.write_text("".join(json.dumps({"video": k, "video_emb": v}) + "\n" for k, v in video_rows.items()))
    log.info("wrote %d rows to %s and %d video embeddings to %s", len(rows), out, len(video_rows), video_out)


if __name__ == "__main__":
    main()
