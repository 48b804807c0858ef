"""Which near-duplicate figures tell a healthy captioner from a collapsed one, greedy and sampled (issue 15).

Reads the recorded captions of the shipped checkpoints (tests/data/val-captions-*.jsonl, made by
bench/caption_val.py: pass 0 greedy, passes 1-3 do_sample=True, temperature=1.0) and two crafted streams:
the paraphrase stream (tests/paraphrases.py: one generic sentence re-worded 97 ways, embedded with the
shipped scorer) and the field report's epoch-5/6 collapse (one-syllable variants of "맑고 화창한 낮의 풍경을
담은 영상"). Prints, per stream, every figure at once: exact unique, near-unique and top-mode share at the
default 0.9 and at the old per-checkpoint 0.97, content-unique (kiwipiepy), Vendi and Vendi / min(n, d) of
the scorer's text embeddings, grounding R@1. Then replays rolling windows of 100 (verdicts from 30) through
the live guard with the new rules, 3 shuffled passes each, and prints when (if ever) each stream is flagged.

    PYTHONPATH=. HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python bench/bench_semantic.py
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np

from capguard.models.diversity import diversity_report
from capguard.models.semantic import content_unique_ratio, vendi_score
from tests.paraphrases import paraphrase_stream

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
SUNNY = "맑고 화창한 낮의 풍경을 담은 영상"


def recorded(name: str) -> tuple[list[dict], dict[str, np.ndarray]]:
    rows = [json.loads(line) for line in (DATA / f"val-captions-{name}.jsonl").read_text().splitlines()]
    videos = {r["video"]: np.array(r["video_emb"], np.float32)
              for r in map(json.loads, (DATA / f"val-captions-{name}-video.jsonl").read_text().splitlines())}
    return rows, videos


def one_syllable_variants(base: str, n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    positions = [i for i, ch in enumerate(base) if ch != " "]
    out = [base, base.replace("풍경", "광경")]
    while len(out) < n:
        pos = positions[int(rng.integers(len(positions)))]
        text = base[:pos] + chr(0xAC00 + int(rng.integers(11172))) + base[pos + 1:]
        if text not in out:
            out.append(text)
    return out


def embed(captions: list[str]) -> np.ndarray:
    from capguard.models.stack import load_stack

    stack = load_stack(ROOT / "checkpoints" / "demo", device="cpu")
    return stack.scorer.text_embeddings(captions).cpu().numpy()   # (n, d)


def figures(captions: list[str], text: np.ndarray | None, video: np.ndarray | None) -> dict:
    at_09 = diversity_report(captions, text if video is not None else None, video, 0.9, with_self_bleu=False,
                             with_distinct_n=False)
    at_097 = diversity_report(captions, near_dup_threshold=0.97, with_self_bleu=False, with_distinct_n=False)
    vendi = vendi_score(text) if text is not None else float("nan")
    return {"n": len(captions), "unique": at_09.unique_ratio, "near@0.9": at_09.near_unique_ratio,
            "top@0.9": at_09.top_mode_share, "near@0.97": at_097.near_unique_ratio,
            "content_unique": content_unique_ratio(captions), "vendi": vendi,
            "r1": at_09.grounding_r1 if at_09.grounding_r1 is not None else float("nan")}


def main() -> None:
    logging.getLogger("capguard.server.guard").setLevel(logging.ERROR)   # the replays collapse on purpose
    streams = {}
    for name in ("demo", "collapsed"):
        rows, videos = recorded(name)
        for p, label in [(0, "greedy"), (1, "sampled T=1.0")]:
            part = [r for r in rows if r["pass"] == p]
            streams[f"{name} {label}"] = ([r["caption"] for r in part], np.array([r["text_emb"] for r in part]),
                                          np.stack([videos[r["video"]] for r in part]))
    para = paraphrase_stream(97)
    field = one_syllable_variants(SUNNY, 97)
    emb = embed(para + field)
    streams["paraphrase stream"] = (para, emb[:97], None)
    streams["field report ep. 5-6"] = (field, emb[97:], None)
    cols = ["n", "unique", "near@0.9", "top@0.9", "near@0.97", "content_unique", "vendi", "r1"]
    print(f"{'stream':<24}" + "".join(f"{c:>15}" for c in cols))
    for name, (captions, text, video) in streams.items():
        f = figures(captions, text, video)
        print(f"{name:<24}" + "".join(f"{f[c]:>15.3f}" if isinstance(f[c], float) else f"{f[c]:>15}" for c in cols))
    replay_windows()
    replay_mixed()


def replay_windows() -> None:
    """Rolling windows through the live guard (phase 2 wires the new rules in; here they are applied beside it)."""
    from capguard.models.semantic import RunningVendi, content_key
    from capguard.server.guard import Guard, GuardSettings

    for name in ("demo", "collapsed"):
        rows, videos = recorded(name)
        for label, passes in [("greedy", [0, 0, 0]), ("sampled", [1, 2, 3])]:
            for seed in range(3):
                rng = random.Random(seed)
                stream = []
                for p in passes:
                    part = [r for r in rows if r["pass"] == p]
                    rng.shuffle(part)
                    stream += part
                guard = Guard(name, GuardSettings())
                window: dict[str, dict] = {}
                vendi = RunningVendi(len(stream[0]["text_emb"]))
                first, rules = None, set()
                low = {"content_unique": 1.0, "near": 1.0, "r1": 1.0, "vendi": 1e9}
                for i, r in enumerate(stream):
                    emb = np.array(r["text_emb"], np.float32)
                    state = guard.observe(r["video"], r["caption"], emb, videos[r["video"]], r["siglip"])
                    old = window.pop(r["video"], None)
                    if old is not None:
                        vendi.remove(old["emb"])
                    window[r["video"]] = {"key": content_key(r["caption"]), "emb": emb}
                    vendi.add(emb)
                    if len(window) > 100:
                        evicted = window.pop(next(iter(window)))
                        vendi.remove(evicted["emb"])
                    if len(window) < 30:
                        continue
                    cu = len({w["key"] for w in window.values()}) / len(window)
                    failing = set(state.tripped) | ({"content_unique_ratio"} if cu < MIN_CONTENT_UNIQUE_RATIO else set())
                    low = {"content_unique": min(low["content_unique"], cu), "near": min(low["near"], state.near_unique_ratio),
                           "r1": min(low["r1"], state.grounding_r1), "vendi": min(low["vendi"], vendi.score())}
                    if failing and first is None:
                        first = i + 1
                    rules |= failing
                print(f"{name:>9} {label:<8} seed {seed}: first flagged at caption {first}, rules {sorted(rules)}, "
                      + ", ".join(f"min {k} {v:.3f}" for k, v in low.items()))


MIN_CONTENT_UNIQUE_RATIO = 0.5   # the unique_ratio line, read on content keys


def replay_mixed(share_sampled: float = 0.5) -> None:
    """One window for greedy and sampled captions, or one per decoding mode? Replays each checkpoint's videos
    (3 shuffled passes) where each request samples with probability ``share_sampled``, through one shared
    guard and through two per-mode guards, with and without scorer embeddings, and prints the first flag."""
    from capguard.server.guard import Guard, GuardSettings

    for name in ("demo", "collapsed"):
        rows, videos = recorded(name)
        by = {(r["pass"], r["video"]): r for r in rows}
        ids = sorted({r["video"] for r in rows})
        for with_emb in (True, False):
            for split in (False, True):
                firsts = []
                for seed in range(3):
                    rng = random.Random(seed)
                    guards = {mode: Guard(f"{name}-{mode}", GuardSettings()) for mode in ("greedy", "sampled")}
                    first = None
                    for p in range(3):
                        order = ids[:]
                        rng.shuffle(order)
                        for vid in order:
                            sampled = rng.random() < share_sampled
                            r = by[(1 + p if sampled else 0, vid)]
                            g = guards["sampled" if sampled and split else "greedy"]
                            emb = (np.array(r["text_emb"], np.float32), videos[vid]) if with_emb else (None, None)
                            g.observe(vid, r["caption"], *emb, r["siglip"])
                            step = p * len(ids) + order.index(vid) + 1
                            if first is None and any(x.state().status == "collapsed" for x in guards.values()):
                                first = step
                    firsts.append(first)
                print(f"{name:>9} {share_sampled:.0%} sampled, {'per-mode windows' if split else 'one window     '}, "
                      f"{'with' if with_emb else 'no  '} embeddings: first flagged at {firsts}")


if __name__ == "__main__":
    main()
