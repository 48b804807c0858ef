"""The field report's stack shape on a GPU: videos/s naive vs batched, prefill MFU, decode vs the HBM bound.

    .venv/bin/python bench/gpu_bench.py                  # H100/H200: LLaMA-2-7B-shaped LLM, ViT-L/14-336, 8 frames
    .venv/bin/python bench/gpu_bench.py --projectors linear --batch 16
    .venv/bin/python bench/gpu_bench.py --tiny           # tiny shapes on the CPU in seconds (CI smoke test)
    .venv/bin/python bench/gpu_bench.py --plan           # no GPU needed: shapes, FLOPs, bytes, H100/H200 limits
    .venv-vllm/bin/python bench/gpu_bench.py --engines hf vllm   # + the vllm engine (make install-vllm; GPU:
                                                                 #   pip install vllm==0.32.0)

Random weights, nothing downloaded: a LLaMA-2-7B-shaped ``LlamaForCausalLM`` (hidden 4096, 32 layers,
32 heads, MLP 11008, vocab 32000) built from a ``LlamaConfig`` in bf16 on the GPU, an open_clip
ViT-L/14-336 vision tower (576 patch tokens per frame, penultimate layer, as LLaVA), 8 frames per
video = 4608 visual tokens, and each projector of the field report: linear and MLP-2L keep all 4608
tokens, the C-Abstractor compresses them to 64 queries. They are wired into this repo's own
``Captioner`` and ``CaptionStack``, so ``stack.caption`` runs exactly the server's code path (frame
preprocessing, encoder, projector, left-padded ``generate``). The LLM's context is raised to 8192
positions: 4608 visual tokens do not fit LLaMA-2's 4096.

Per projector:
- videos/s: ``--naive-videos`` videos one ``stack.caption`` call each, against one call on ``--batch``
  videos; every video generates exactly ``--new-tokens`` tokens (the end-of-text id lies outside the
  vocabulary, so random weights never stop early). "same" counts videos whose tokens agree.
- prefill: one forward over the batch's full prompts (``logits_to_keep=1``, as generate does);
  TFLOP/s counts 2 FLOPs per multiply-add of every layer's linear weights per token, causal attention
  (QK^T and AV over half the score matrix) and the last position's LM head; as a share of the card's
  dense bf16 peak (H100 SXM / H200: 989 TFLOP/s).
- decode: (generate time - prefill time) / (new tokens - 1) per step, against the memory bound: each
  step reads every weight but the embedding table once plus the batch's KV cache, at the card's HBM
  bandwidth (H100 SXM 3.35 TB/s, H200 4.8 TB/s).

With ``--engines ... vllm``: the random LLM is written to a temporary directory and vLLM loads it (its
own copy, in the same dtype; the engine core is a separate process), then the same ``--batch`` videos go
through ``stack.caption`` with the vllm engine, all requests at once (continuous batching, paged KV,
CUDA graphs on a GPU). "vllm v/s" against "batch v/s" is the engine's gain at that batch, and "same"
counts rows equal to HF's one-by-one ones (bf16: a flip is a near-tie, bench/parity_vllm.py).

GPU timings are CUDA events after ``torch.cuda.synchronize``; CPU ones ``time.perf_counter``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from capguard.models.captioner import Captioner  # noqa: E402
from capguard.models.config import (  # noqa: E402
    CheckpointConfig,
    GenerationConfig,
    LLMConfig,
    ProjectorConfig,
    VisionConfig,
)
from capguard.models.encoder import VisionEncoder  # noqa: E402
from capguard.models.projector import build_projector  # noqa: E402
from capguard.models.stack import CaptionStack  # noqa: E402

OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Shapes:
    """Model and workload sizes."""
    hidden: int                  # LLM width (LLaMA-2-7B: 4096)
    intermediate: int            # LLM MLP width (11008)
    layers: int                  # LLM blocks (32)
    heads: int                   # attention heads (32, no GQA in LLaMA-2-7B)
    vocab: int                   # (32000)
    vision: dict                 # open_clip vision_cfg
    frames: int                  # frames per video (the field report: 8)
    queries: int                 # C-Abstractor queries (64)
    new_tokens: int              # tokens generated per video
    batch: int                   # videos per batched call
    naive_videos: int            # videos captioned one call each
    max_positions: int = 8192    # LLM context: 4608 visual tokens do not fit LLaMA-2's 4096
    text: dict = field(default_factory=lambda: {"context_length": 8, "vocab_size": 64, "width": 64, "heads": 1,
                                                "layers": 1})   # open_clip needs a text tower; ours is unused


def field_report_shapes(batch: int, new_tokens: int, naive_videos: int) -> Shapes:
    import open_clip

    vision = dict(open_clip.get_model_config("ViT-L-14-336")["vision_cfg"])   # 336 px, patch 14, width 1024
    return Shapes(hidden=4096, intermediate=11008, layers=32, heads=32, vocab=32000, vision=vision, frames=8,
                  queries=64, new_tokens=new_tokens, batch=batch, naive_videos=naive_videos)


# head_dim 64: vLLM's CPU attention rejects 16 ("Unsupported CPU attention configuration"); 48 (demo) and 64 ran
TINY = Shapes(hidden=64, intermediate=128, layers=2, heads=1, vocab=512, frames=2, queries=8, new_tokens=4,
              batch=4, naive_videos=2, max_positions=512,
              vision={"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32})


# peak dense bf16 TFLOP/s and HBM TB/s, by device name (NVIDIA's datasheets)
CARDS = [("H200", 989.0, 4.8), ("H100 NVL", 835.0, 3.9), ("H100 PCIe", 756.0, 2.0), ("H100", 989.0, 3.35)]


def card_limits(device: torch.device, peak: float | None, bandwidth: float | None) -> tuple[str, float | None,
                                                                                             float | None]:
    """(device name, peak TFLOP/s, HBM TB/s); explicit values win, unknown devices give None.

    Example: "NVIDIA H100 80GB HBM3" -> (..., 989.0, 3.35).
    """
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    for key, card_peak, card_bw in CARDS:
        if key in name:
            return name, peak or card_peak, bandwidth or card_bw
    return name, peak, bandwidth


class StubTokenizer:
    """What Captioner needs of a tokenizer: the prompt "<video>\\n" as [BOS] + [visual] + [one id], a
    decode, and an end-of-text id that random weights never produce (outside the vocabulary)."""

    def __init__(self, vocab: int):
        self.bos_token_id, self.pad_token_id, self.eos_token_id = 1, 0, vocab

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + [13] * len(text)}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


class Timer:
    """Elapsed seconds of a block: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self) -> Timer:
        if self.cuda:
            torch.cuda.synchronize()
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1000
        else:
            self.seconds = time.perf_counter() - self.t0


def build_parts(shapes: Shapes, device: torch.device, dtype: torch.dtype):
    """(vision encoder, LLM) with random weights, on `device` in `dtype`."""
    import open_clip
    from transformers import AutoModelForCausalLM, LlamaConfig

    with torch.device(device):
        clip = open_clip.CLIP(embed_dim=64, vision_cfg=shapes.vision, text_cfg=shapes.text)
        config = LlamaConfig(hidden_size=shapes.hidden, intermediate_size=shapes.intermediate,
                             num_hidden_layers=shapes.layers, num_attention_heads=shapes.heads,
                             num_key_value_heads=shapes.heads, vocab_size=shapes.vocab,
                             max_position_embeddings=shapes.max_positions, bos_token_id=1, eos_token_id=2,
                             pad_token_id=0, tie_word_embeddings=False)
        llm = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    preprocess = {"size": shapes.vision["image_size"], "mean": OPENAI_MEAN, "std": OPENAI_STD,
                  "interpolation": "bicubic", "resize_mode": "shortest"}
    encoder = VisionEncoder(clip.visual.to(device=device, dtype=dtype).eval(), preprocess).to(device)
    return encoder, llm.to(device).eval()


def make_stack(kind: str, shapes: Shapes, encoder, llm, device: torch.device, dtype: torch.dtype) -> CaptionStack:
    options = {"num_queries": shapes.queries} if kind == "c-abstractor" else {}
    with torch.device(device):
        projector = build_projector(kind, encoder.width, shapes.hidden, **options)
    captioner = Captioner(encoder, projector.to(device=device, dtype=dtype).eval(), llm, StubTokenizer(shapes.vocab),
                          "<video>\n")
    captioner.prefix_ids, captioner.suffix_ids = captioner.prefix_ids.to(device), captioner.suffix_ids.to(device)
    config = CheckpointConfig(vision=VisionConfig(path="random"), projector=ProjectorConfig(kind, options=options),
                              llm=LLMConfig(path="random"), num_frames=shapes.frames,
                              generation=GenerationConfig(max_new_tokens=shapes.new_tokens))
    return CaptionStack(kind, Path("."), config, captioner, None, None, "random-init", device, dtype)


def prefill_flops(llm, batch: int, seq: int) -> float:
    """FLOPs of one prefill forward (module docstring): linear weights, causal attention, last-position head."""
    cfg = llm.config
    linear = sum(m.weight.numel() for m in llm.model.layers.modules() if isinstance(m, torch.nn.Linear))
    attention = cfg.num_hidden_layers * 2 * seq * seq * cfg.hidden_size   # 2 matmuls x 2 FLOPs x half (causal)
    return batch * (2 * seq * linear + attention + 2 * cfg.hidden_size * cfg.vocab_size)


def step_bytes(llm, batch: int, context: int) -> float:
    """Bytes one decode step must read: every weight but the embedding table, plus the KV cache."""
    cfg = llm.config
    weights = sum(p.numel() * p.element_size() for name, p in llm.named_parameters() if "embed_tokens" not in name)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * batch * context * cfg.num_key_value_heads * head_dim * llm.dtype.itemsize
    return weights + kv


@dataclass
class Row:
    projector: str
    visual_tokens: int
    naive_vps: float
    batched_vps: float
    same: str
    encode_ms: float
    prefill_ms: float
    prefill_tflops: float
    decode_ms: float
    step_bytes: float       # what one decode step must read (step_bytes())
    vllm_vps: float | None = None   # --engines vllm: the batch through the vllm engine, videos/s
    vllm_same: str = "-"            # its rows equal to HF's one-by-one ones


def measure(stack: CaptionStack, shapes: Shapes, device: torch.device, repeats: int) -> Row:
    rng = np.random.default_rng(0)
    size = shapes.vision["image_size"]
    videos = [rng.integers(0, 256, (shapes.frames, size, size, 3), dtype=np.uint8)
              for _ in range(max(shapes.batch, shapes.naive_videos))]
    timer = lambda: Timer(device)   # noqa: E731
    stack.caption(videos[:1], score=False)                      # warm-up: kernels, allocator
    stack.caption(videos[:shapes.batch], score=False)

    with timer() as naive:
        singles = [stack.caption([v], score=False)[0][0] for v in videos[:shapes.naive_videos]]
    batched_s = []
    for _ in range(repeats):
        with timer() as t:
            batched, _ = stack.caption(videos[:shapes.batch], score=False)
        batched_s.append(t.seconds)
    same = sum(a.token_ids == b.token_ids for a, b in zip(singles, batched, strict=False))

    cap = stack.captioner
    with torch.inference_mode():
        with timer() as encode:
            pixels = stack.pixels(videos[:shapes.batch], cap.encoder.preprocess)
            visual = cap.project(cap.visual_tokens(pixels, [shapes.frames] * shapes.batch))
        embeds, mask, _, _ = cap.build_inputs(visual)           # (B, S, D)
        prefill, generate = [], []
        for _ in range(repeats):
            with timer() as t:
                cap.llm(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=1)
            prefill.append(t.seconds)
            with timer() as t:
                cap.generate(visual, stack.config.generation)
            generate.append(t.seconds)
    seq = embeds.shape[1]
    prefill_s = statistics.median(prefill)
    step_s = (statistics.median(generate) - prefill_s) / max(1, shapes.new_tokens - 1)
    return Row(stack.name, visual[0].shape[0], shapes.naive_videos / naive.seconds,
               shapes.batch / statistics.median(batched_s), f"{same}/{min(shapes.naive_videos, shapes.batch)}",
               1000 * encode.seconds, 1000 * prefill_s, prefill_flops(cap.llm, shapes.batch, seq) / prefill_s / 1e12,
               1000 * step_s, step_bytes(cap.llm, shapes.batch, seq + shapes.new_tokens // 2))


@dataclass
class ExactLength(GenerationConfig):
    """Exactly max_new_tokens per video in both engines (HF: min_new_tokens, vLLM: min_tokens): the
    saved LLM's own EOS id could otherwise stop vLLM's rows early on random weights."""
    min_new_tokens: int = 0


def measure_vllm(stack: CaptionStack, shapes: Shapes, device: torch.device, repeats: int, llm_dir: Path,
                 row: Row) -> None:
    """Fill row.vllm_vps / vllm_same: the same videos as ``measure`` through a vllm engine on llm_dir."""
    from capguard.models.engines.vllm_engine import VLLMCore, VLLMEngine

    core = getattr(measure_vllm, "core", None) or VLLMCore(llm_dir, stack.dtype)   # one core for all projectors
    measure_vllm.core = core
    vllm_stack = CaptionStack(stack.name, stack.directory, stack.config, stack.captioner, None, None,
                              stack.fingerprint, device, stack.dtype, VLLMEngine(stack.captioner, core))
    n = shapes.new_tokens
    exact = ExactLength(max_new_tokens=n, min_new_tokens=n)
    rng = np.random.default_rng(0)
    size = shapes.vision["image_size"]
    videos = [rng.integers(0, 256, (shapes.frames, size, size, 3), dtype=np.uint8)
              for _ in range(max(shapes.batch, shapes.naive_videos))]
    vllm_stack.caption(videos[:shapes.batch], score=False, generation=exact)       # warm-up
    seconds = []
    for _ in range(repeats):
        with Timer(device) as t:
            out, _ = vllm_stack.caption(videos[:shapes.batch], score=False, generation=exact)
        seconds.append(t.seconds)
    singles = [stack.caption([v], score=False, generation=exact)[0][0] for v in videos[:shapes.naive_videos]]
    same = sum(a.token_ids == b.token_ids for a, b in zip(singles, out, strict=False))
    row.vllm_vps = shapes.batch / statistics.median(seconds)
    row.vllm_same = f"{same}/{min(shapes.naive_videos, shapes.batch)}"


def vision_flops(visual, tokens: int) -> float:
    """FLOPs of one frame through the vision tower: every weight matrix (attention in/out projections, MLP,
    patch embedding) per token, plus attention scores and values over all tokens."""
    linear = sum(p.numel() for name, p in visual.named_parameters() if p.dim() >= 2 and "weight" in name)
    blocks = [m for m in visual.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    width = blocks[0].embed_dim if blocks else 0
    return 2 * tokens * linear + len(blocks) * 4 * tokens * tokens * width


def plan(shapes: Shapes, projectors: list[str]) -> None:
    """The limits without running anything: shapes on the meta device, FLOPs and bytes per video, and what
    an H100 SXM / H200 allows at best (prefill at the dense bf16 peak, decode at the HBM bound)."""
    encoder, llm = build_parts(shapes, torch.device("meta"), torch.bfloat16)
    frame_tokens = encoder.tokens_per_frame + 1                 # with CLS, as the tower computes
    vision = shapes.frames * vision_flops(encoder.visual, frame_tokens)
    print(f"LLM {sum(p.numel() for p in llm.parameters()) / 1e9:.3f}B params; vision "
          f"{sum(p.numel() for p in encoder.visual.parameters()) / 1e6:.0f}M params, {vision / 1e12:.2f} TFLOP per "
          f"video ({shapes.frames} frames x {frame_tokens} tokens); batch {shapes.batch}")
    print(f"{'projector':<13} {'params':>8} {'prompt':>6} {'prefill TFLOP/v':>15} "
          + " ".join(f"{card + ' ms/v':>12} {card + ' tok/s b1':>15} {f'tok/s b{shapes.batch}':>11}"
                     for card, _, _ in (CARDS[0], CARDS[3])))
    for kind in projectors:
        options = {"num_queries": shapes.queries} if kind == "c-abstractor" else {}
        params = sum(p.numel() for p in build_projector(kind, encoder.width, shapes.hidden, **options).parameters())
        visual = shapes.queries if kind == "c-abstractor" else shapes.frames * encoder.tokens_per_frame
        seq = visual + 2                                         # [BOS] visual "\n" (the stub prompt)
        prefill = prefill_flops(llm, 1, seq)
        cells = []
        for _, peak, bandwidth in (CARDS[0], CARDS[3]):
            ideal_ms = 1000 * (vision + prefill) / (peak * 1e12)
            b1 = 1 / (step_bytes(llm, 1, seq + shapes.new_tokens // 2) / (bandwidth * 1e12))
            bn = shapes.batch / (step_bytes(llm, shapes.batch, seq + shapes.new_tokens // 2) / (bandwidth * 1e12))
            cells.append(f"{ideal_ms:>12.1f} {b1:>15.0f} {bn:>11.0f}")
        print(f"{kind:<13} {params / 1e6:>7.1f}M {seq:>6} {prefill / 1e12:>15.1f} " + " ".join(cells))
    print("ms/v: vision + prefill of one video at the dense bf16 peak; tok/s: decode at the HBM bound "
          f"(weights + KV cache read once per step, context = prompt + {shapes.new_tokens // 2})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (seconds; CI smoke test)")
    parser.add_argument("--plan", action="store_true", help="print the shapes and the H100/H200 limits (meta "
                        "device: no GPU, no memory, seconds) and exit")
    parser.add_argument("--projectors", nargs="+", default=["linear", "mlp2x_gelu", "c-abstractor"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--naive-videos", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the card's dense bf16 peak")
    parser.add_argument("--hbm-tbs", type=float, default=None, help="override the card's HBM bandwidth, TB/s")
    parser.add_argument("--engines", nargs="+", default=["hf"], choices=["hf", "vllm"],
                        help="hf always runs (the reference); vllm adds the vllm engine's videos/s")
    args = parser.parse_args()
    if args.plan:
        plan(TINY if args.tiny else field_report_shapes(args.batch, args.new_tokens, args.naive_videos),
             args.projectors)
        return

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.tiny:
        shapes, dtype = TINY, torch.float32
    else:
        shapes = field_report_shapes(args.batch, args.new_tokens, args.naive_videos)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if device.type != "cuda":
            print("warning: no GPU; the full shapes on a CPU take very long (use --tiny for a smoke run)")
    name, peak, bandwidth = card_limits(device, args.peak_tflops, args.hbm_tbs)
    torch.manual_seed(0)
    started = time.perf_counter()
    encoder, llm = build_parts(shapes, device, dtype)
    print(f"device {name}; {dtype}; LLM {sum(p.numel() for p in llm.parameters()) / 1e6:,.1f}M params, "
          f"{shapes.layers} layers x {shapes.hidden}; vision {encoder.tokens_per_frame} tokens/frame x "
          f"{shapes.frames} frames, width {encoder.width}; batch {shapes.batch}, {shapes.new_tokens} new tokens; "
          f"peak {peak or '?'} TFLOP/s, HBM {bandwidth or '?'} TB/s; built in {time.perf_counter() - started:.1f} s",
          flush=True)

    llm_dir = None
    if "vllm" in args.engines:
        import tempfile

        llm_dir = Path(tempfile.mkdtemp(prefix="capguard-gpu-bench-llm-"))
        llm.save_pretrained(str(llm_dir))                 # vLLM loads its own copy from a directory
    rows = []
    for kind in args.projectors:
        try:
            stack = make_stack(kind, shapes, encoder, llm, device, dtype)
            rows.append(measure(stack, shapes, device, args.repeats))
            if llm_dir is not None:
                measure_vllm(stack, shapes, device, args.repeats, llm_dir, rows[-1])
        except torch.cuda.OutOfMemoryError as exc:
            print(f"{kind}: out of GPU memory ({str(exc).splitlines()[0]}); try a smaller --batch")
        if device.type == "cuda":
            torch.cuda.empty_cache()

    pct = lambda value, limit: f"{100 * value / limit:.0f}%" if limit else "-"   # noqa: E731
    print(f"\n{'projector':<13} {'vis tok':>7} {'naive v/s':>9} {'batch v/s':>9} {'ratio':>6} {'same':>5} "
          f"{'encode ms':>9} {'prefill ms':>10} {'TFLOP/s':>8} {'of peak':>7} {'step ms':>8} {'tok/s':>8} "
          f"{'bound tok/s':>11} {'of bound':>8}")
    for r in rows:
        bound_ms = r.step_bytes / (bandwidth * 1e12) * 1e3 if bandwidth else None
        bound_tps = shapes.batch / (bound_ms / 1000) if bound_ms else None
        tps = shapes.batch / (r.decode_ms / 1000) if r.decode_ms > 0 else float("nan")
        print(f"{r.projector:<13} {r.visual_tokens:>7} {r.naive_vps:>9.2f} {r.batched_vps:>9.2f} "
              f"{r.batched_vps / r.naive_vps:>5.2f}x {r.same:>5} {r.encode_ms:>9.1f} {r.prefill_ms:>10.1f} "
              f"{r.prefill_tflops:>8.2f} {pct(r.prefill_tflops, peak):>7} {r.decode_ms:>8.2f} {tps:>8.0f} "
              f"{'-' if bound_tps is None else f'{bound_tps:.0f}':>11} "
              f"{pct(tps, bound_tps) if bound_tps else '-':>8}")
    if llm_dir is not None:
        print(f"\n{'projector':<13} {'batch v/s':>9} {'vllm v/s':>9} {'vllm/hf':>7} {'same':>5}")
        for r in rows:
            gain = f"{r.vllm_vps / r.batched_vps:>6.2f}x" if r.vllm_vps else "      -"
            print(f"{r.projector:<13} {r.batched_vps:>9.2f} {r.vllm_vps or float('nan'):>9.2f} {gain} {r.vllm_same:>5}")
        import shutil

        if getattr(measure_vllm, "core", None) is not None:   # end the engine process before interpreter teardown
            measure_vllm.core.close()
            del measure_vllm.core
        shutil.rmtree(llm_dir, ignore_errors=True)
    if not rows:
        sys.exit(1)


if __name__ == "__main__":
    main()
