"""Engine parity: compare two engines' greedy token ids, and explain each difference with HF's own logits.

Greedy decoding is deterministic only up to floating-point order: two engines that add the same numbers in
a different order can flip a step whose two best logits (nearly) tie, and after a flip the rows differ.
``divergence`` finds the first differing step and teacher-forces the HF LLM over the shared prefix to get
that step's top-2 logit gap: a gap within ``eps`` is a tie, anything larger is a real bug. Reference rows
are HF's *one-by-one* greedy loop (batch 1): HF's own batched generate drifts against itself (left padding
changes the reduction order), so it is no reference.

    ids_a=[5, 9, 7, 1], ids_b=[5, 9, 3, 1] -> step 2; gap = logit(top1) - logit(top2) after [prompt, 5, 9]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from capguard.models.captioner import Captioner, Generated


@dataclass
class Divergence:
    index: int                  # which row
    step: int                   # first generated position where the two rows differ
    gap: float                  # HF top-1 minus top-2 logit at that step (fp32)
    tokens: tuple[int, int]     # what each engine chose there (-1: that row had ended)
    top2: tuple[int, int]       # HF's two best tokens there

    def is_tie(self, eps: float) -> bool:
        """A flip between HF's two best tokens whose logits are within eps: both engines are right."""
        return self.gap <= eps and set(self.tokens) <= set(self.top2) | {-1}


def first_difference(a: list[int], b: list[int]) -> int | None:
    """First index where two id lists differ (a longer list differs at the shorter's end); None if equal.

    Example: [1, 2, 3], [1, 2, 4] -> 2; [1, 2], [1, 2, 3] -> 2; [1, 2], [1, 2] -> None.
    """
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@torch.inference_mode()
def divergence(captioner: Captioner, visual: torch.Tensor, a: Generated, b: Generated, index: int = 0,
               eos_too: bool = True) -> Divergence | None:
    """Where ``a`` and ``b`` (two engines' captions of one (Q, D_llm) visual block) part, and HF's top-2 gap there.

    Rows are compared with their EOS appended (when ``eos_too``), so a row that stops where the other goes on
    differs at the step that chose EOS.
    """
    ids_a = a.token_ids + ([captioner.eos_id] if eos_too else [])
    ids_b = b.token_ids + ([captioner.eos_id] if eos_too else [])
    step = first_difference(ids_a, ids_b)
    if step is None:
        return None
    embed = captioner.llm.get_input_embeddings()
    prefix = torch.tensor(ids_a[:step], dtype=torch.long, device=captioner.device)
    seq = torch.cat([captioner.sequence(visual.to(captioner.device)), embed(prefix)])          # (L + step, D)
    logits = captioner.llm(inputs_embeds=seq[None].to(embed.weight.dtype)).logits[0, -1].float()   # (V,)
    top = torch.topk(logits, 2)
    tokens = (ids_a[step] if step < len(ids_a) else -1, ids_b[step] if step < len(ids_b) else -1)
    return Divergence(index, step, float(top.values[0] - top.values[1]), tokens,
                      (int(top.indices[0]), int(top.indices[1])))


def _verdict(stack, outputs) -> dict:
    """The evaluation verdict (capguard evaluate's rules) over one engine's captions of the whole set."""
    from dataclasses import replace

    import numpy as np

    from capguard.models.diversity import diversity_report
    from capguard.models.rules import GuardThresholds, tripped_rules

    thresholds = replace(GuardThresholds(), **stack.config.guard)
    grounded = all(o.text_emb is not None for o in outputs)
    report = diversity_report([o.caption for o in outputs],
                              np.stack([o.text_emb for o in outputs]) if grounded else None,    # (n, E)
                              np.stack([o.video_emb for o in outputs]) if grounded else None,   # (n, E)
                              near_dup_threshold=thresholds.near_dup_threshold, with_self_bleu=False)
    tripped = tripped_rules(report, thresholds)
    return {"status": "collapsed" if tripped else "ok", "tripped": tripped, "unique": report.unique,
            "n": report.n, "grounding_r1": report.grounding_r1}


def compare_engines(checkpoint_dir, frames: list, cache=None, eps: float = 1e-3, device: str = "cpu") -> dict:
    """Caption ``frames`` ((T, H, W, 3) uint8 arrays) with the hf engine one by one and the vllm engine all at
    once (same checkpoint, same dtype), and report equal rows, each difference with its HF top-2 gap, and the
    guard verdict of each engine's captions. Timings are wall seconds of the whole pass (encode and score too).
    """
    import time

    from capguard.models.stack import ComponentCache, load_stack

    cache = cache if cache is not None else ComponentCache()
    hf = load_stack(checkpoint_dir, device=device, cache=cache, engine="hf")
    vl = load_stack(checkpoint_dir, device=device, cache=cache, engine="vllm")
    t0 = time.perf_counter()
    ref = [hf.caption([f])[0][0] for f in frames]          # the reference: HF greedy, batch 1
    t1 = time.perf_counter()
    got, _ = vl.caption(frames)                            # every request in vLLM at once
    t2 = time.perf_counter()
    cap = hf.captioner
    differences = []
    with torch.inference_mode():
        for i, (a, b) in enumerate(zip(ref, got, strict=True)):
            if a.token_ids != b.token_ids:
                pixels = hf.pixels([frames[i]], cap.encoder.preprocess)
                vis = cap.project(cap.visual_tokens(pixels, [len(frames[i])]))[0]          # (Q, D_llm)
                differences.append(divergence(cap, vis, Generated(a.caption, a.token_ids),
                                              Generated(b.caption, b.token_ids), index=i))
    return {"checkpoint": hf.name, "dtype": str(hf.dtype).removeprefix("torch."), "n": len(frames),
            "equal": len(frames) - len(differences), "differences": differences,
            "ties": sum(d.is_tie(eps) for d in differences), "eps": eps,
            "captions": {"hf": [o.caption for o in ref], "vllm": [o.caption for o in got]},
            "verdict": {"hf": _verdict(hf, ref), "vllm": _verdict(vl, got)},
            "seconds": {"hf_one_by_one": t1 - t0, "vllm_all_at_once": t2 - t1}}
