"""``capguard train``: the field report's recipe, in miniature, on the CPU.

1. A SigLIP-style contrastive model (sigmoid loss) on (video, caption) pairs. Its vision tower
   becomes the captioner's encoder and the whole model is the scorer.
2. A small Llama-architecture LM, pre-trained on caption text.
3. The captioner: stage 1 trains the projector only, stage 2 the projector and the LLM; warmup +
   cosine LR, gradient clipping, early stopping on validation loss. Every epoch is validated the
   way capguard watches a server (one implementation: capguard.models.diversity, through the
   DiversityMonitor that capguard.callbacks wraps for other trainers), its captions written as
   <run>/captions-epoch-N.jsonl, and written as a checkpoint that points at the shared encoder (and
   at the pre-trained LLM while it is frozen). With ``stop_on_collapse`` N the run stops itself
   after N epochs in a row that are collapsed and not recovering (the monitor's rule) and says
   which guard rules tripped and how the figures moved.

Vision features are computed once (the encoder is frozen while the captioner trains), so an
epoch costs only projector + LLM work.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from capguard.models.captioner import Captioner
from capguard.models.components import (
    TinySizes,
    build_clip,
    build_llm,
    clip_model_config,
    preprocess_config,
    train_tokenizer,
    write_checkpoint,
    write_llm_dir,
    write_open_clip_dir,
)
from capguard.models.config import GenerationConfig, ScorerConfig, VisionConfig
from capguard.models.encoder import FramePreprocessor, VisionEncoder, load_open_clip
from capguard.models.evaluate.metrics import attribute_scores
from capguard.models.monitor import DiversityMonitor
from capguard.models.projector import build_projector
from capguard.models.rules import GuardThresholds
from capguard.models.scorer import Scorer, load_tokenizer, pool_frames
from capguard.models.video import sample_frames

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    data: str                          # dir with train.jsonl / val.jsonl (capguard make-videos)
    out: str                           # output root: shared/ components + <run>/epoch-N checkpoints
    run: str = "mlp2x_gelu"            # run name: the checkpoint directories go under out/<run>
    lang: str = "ko"                   # caption language of the manifests (caption_ko / caption_en)
    projector: str = "mlp2x_gelu"
    projector_options: dict = field(default_factory=dict)
    num_frames: int = 8                # the field report's 8 frames
    select_layer: int = -2             # encoder block feeding the projector (LLaVA: penultimate)
    select_feature: str = "patch"      # "patch" or "cls_patch" (adds the block's CLS token per frame)
    sizes: TinySizes = field(default_factory=lambda: TinySizes(
        image_size=64, patch_size=16, vision_width=128, vision_layers=4, text_width=128, text_layers=3,
        context_length=32, embed_dim=128, llm_hidden=192, llm_layers=3, llm_heads=4, vocab_size=768))
    reuse_shared: bool = True          # reuse out/shared (encoder, scorer, LM) when it exists: runs compare projectors
    siglip_epochs: int = 60
    siglip_lr: float = 1e-3
    siglip_batch: int = 32             # many small steps beat few large ones on 865 pairs (R@1 .10 -> .53 at 30 epochs)
    siglip_frames: int = 1             # one random frame per video per step: augmentation at 1/8 of the cost
    lm_epochs: int = 8
    lm_lr: float = 2e-3
    stage1_epochs: int = 3             # projector only: align vision tokens with the frozen LM
    stage1_lr: float = 1e-3
    stage2_epochs: int = 6             # projector + LLM
    stage2_lr: float = 3e-4
    batch_size: int = 16
    warmup_ratio: float = 0.1          # warmup + cosine decay, as in the field report's runs
    max_grad_norm: float = 1.0
    patience: int = 3                  # early stopping on validation loss
    # stop after this many epochs in a row that are collapsed and not recovering (DiversityMonitor's patience;
    # None: report only). 4 lets the MLP-2L recipes' projector-only dip (40, 23, 9 of 97) and their slow first
    # stage-2 epoch pass and stops the C-Abstractor recipe at epoch 5 (tests/test_monitor_runs.py replays them)
    stop_on_collapse: int | None = None
    # epochs not counted towards stop_on_collapse on top of the first (which is the recovery baseline); 0 stops
    # a run that collapses from its first epoch on, as the field report's C-Abstractor did, earliest
    collapse_warmup: int = 0
    weight_decay: float = 0.0
    seed: int = 0
    limit_train: int | None = None     # for smoke tests
    limit_val: int | None = None
    save_dtype: str = "float16"        # weights on disk (the demo stack must stay small)
    threads: int | None = None


def read_manifest(path: Path, lang: str, limit: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for row in rows:
        row["caption"] = row[f"caption_{lang}"]
        row["abs_path"] = str((path.parent / row["path"]).resolve())
    return rows[:limit] if limit else rows


def load_frames(rows: list[dict], num_frames: int, side: int) -> torch.Tensor:
    """(N, T, H, W, 3) uint8 frames of every video, sampled exactly as the server samples them."""
    clips = [sample_frames(r["abs_path"], num_frames, max_side=side).frames
             for r in tqdm(rows, desc="frames", leave=False)]
    return torch.from_numpy(np.stack(clips))


def cosine_schedule(optimizer, total_steps: int, warmup_ratio: float):
    warmup = max(1, int(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def batches(n: int, size: int, rng: random.Random | None):
    order = list(range(n))
    if rng is not None:
        rng.shuffle(order)
    for i in range(0, n, size):
        yield order[i:i + size]


# ---- 1. the SigLIP-style scorer / encoder ---------------------------------------------------------

def video_features(model, pixels: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """(N, T, 3, S, S) preprocessed pixels -> (N, E), pooled as the scorer pools (scorer.pool_frames)."""
    out = []
    for i in range(0, pixels.shape[0], batch):
        clip = pixels[i:i + batch].float()
        n, t = clip.shape[:2]
        out.append(pool_frames(model.encode_image(clip.flatten(0, 1)), [t] * n))   # (n, E)
    return torch.cat(out)


@torch.inference_mode()
def preprocess_all(preprocess, frames: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """(N, T, H, W, 3) uint8 -> (N, T, 3, S, S) float16 model inputs, computed once per run."""
    chunks = [preprocess(frames[i:i + batch].flatten(0, 1)).half() for i in range(0, frames.shape[0], batch)]
    return torch.cat(chunks).view(frames.shape[0], frames.shape[1], *chunks[0].shape[1:])


def train_siglip(cfg: TrainConfig, tokenizer, train_frames, train_caps, val_frames, val_caps):
    """Sigmoid-loss contrastive training. Each step sees ``siglip_frames`` random frames of each video
    (augmentation, and 4x cheaper than all 8); validation embeds all frames, as the scorer does."""
    model_cfg = clip_model_config(cfg.sizes, len(tokenizer))
    model = build_clip(model_cfg)
    preprocess = FramePreprocessor(preprocess_config(cfg.sizes.image_size))
    train_pix, val_pix = preprocess_all(preprocess, train_frames), preprocess_all(preprocess, val_frames)
    gen = torch.Generator().manual_seed(cfg.seed)
    ids = lambda caps: tokenizer(caps, padding="max_length", truncation=True,  # noqa: E731
                                 max_length=cfg.sizes.context_length, return_tensors="pt")["input_ids"]
    train_ids = ids(train_caps)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.siglip_lr, weight_decay=0.05)
    steps = cfg.siglip_epochs * math.ceil(len(train_caps) / cfg.siglip_batch)
    sched = cosine_schedule(opt, steps, cfg.warmup_ratio)
    rng = random.Random(cfg.seed)
    bar = tqdm(range(cfg.siglip_epochs), desc="siglip")
    for _epoch in bar:
        model.train()
        for idx in batches(len(train_caps), cfg.siglip_batch, rng):
            pick = torch.rand(len(idx), train_pix.shape[1], generator=gen).argsort(1)[:, :cfg.siglip_frames]
            clips = train_pix[idx].gather(1, pick.view(*pick.shape, 1, 1, 1).expand(-1, -1, *train_pix.shape[2:]))
            img = video_features(model, clips, batch=len(idx))
            txt = F.normalize(model.encode_text(train_ids[idx]), dim=-1)
            logits = model.logit_scale.exp() * img @ txt.T + model.logit_bias
            labels = 2 * torch.eye(len(idx)) - 1
            loss = -F.logsigmoid(labels * logits).sum() / len(idx)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            opt.step()
            sched.step()
        r1 = retrieval_r1(model, val_pix, ids(val_caps))
        bar.set_postfix(loss=f"{loss.item():.3f}", val_r1=f"{r1:.2f}")
    model.eval()
    log.info("siglip: val caption->video R@1 %.3f", r1)
    return model, model_cfg, r1


@torch.inference_mode()
def retrieval_r1(model, pixels, text_ids) -> float:
    """Share of captions whose own video scores highest (ties broken against the caption)."""
    model.eval()
    vid = video_features(model, pixels)
    txt = F.normalize(model.encode_text(text_ids), dim=-1)
    sim = txt @ vid.T
    own = sim.diagonal()
    others = sim - torch.eye(len(own)) * 1e9
    model.train()
    return float((own > others.max(1).values).float().mean())


# ---- 2. the language model ------------------------------------------------------------------------

def train_lm(cfg: TrainConfig, tokenizer, captions: list[str]):
    llm = build_llm(tokenizer, cfg.sizes)
    data = [tokenizer(c)["input_ids"] + [tokenizer.eos_token_id] for c in captions]
    opt = torch.optim.AdamW(llm.parameters(), lr=cfg.lm_lr)
    steps = cfg.lm_epochs * math.ceil(len(data) / cfg.batch_size)
    sched = cosine_schedule(opt, steps, cfg.warmup_ratio)
    rng = random.Random(cfg.seed)
    for _epoch in tqdm(range(cfg.lm_epochs), desc="lm"):
        llm.train()
        for idx in batches(len(data), cfg.batch_size * 2, rng):
            rows = [data[i] for i in idx]
            length = max(map(len, rows))
            input_ids = torch.full((len(rows), length), tokenizer.pad_token_id)
            labels = torch.full((len(rows), length), -100)
            for j, row in enumerate(rows):
                input_ids[j, :len(row)] = torch.tensor(row)
                labels[j, :len(row)] = torch.tensor(row)
            loss = llm(input_ids=input_ids, attention_mask=(labels != -100).long(), labels=labels).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(llm.parameters(), cfg.max_grad_norm)
            opt.step()
            sched.step()
    llm.eval()
    log.info("lm: final train loss %.3f", loss.item())
    return llm


# ---- 3. the captioner -----------------------------------------------------------------------------

@torch.inference_mode()
def encode_all(encoder: VisionEncoder, frames: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """(N, T, H, W, 3) -> (N, T*P, D) vision tokens of the frozen encoder."""
    out = []
    for i in range(0, frames.shape[0], batch):
        clip = frames[i:i + batch]
        tokens = encoder(encoder.preprocess(clip.flatten(0, 1)))                 # (n*T, P, D)
        out.append(tokens.reshape(clip.shape[0], -1, tokens.shape[-1]))
    return torch.cat(out)


@dataclass
class EpochStats:
    stage: int
    epoch: int
    train_loss: float
    val_loss: float
    report: dict
    siglip_mean: float
    attribute_accuracy: float | None
    tripped: list[str]
    checkpoint: str
    seconds: float
    stopped: str | None = None         # why training stopped here on collapse (the monitor's reason)


def validate(captioner: Captioner, val_feats, val_rows, val_targets, scorer: Scorer, val_video_emb,
             batch: int, lang: str):
    """Validation loss, greedy captions, their (n, E) text embeddings, SigLIP per caption, attribute accuracy."""
    captioner.eval()
    losses, captions = [], []
    with torch.inference_mode():
        for idx in batches(len(val_rows), batch, None):
            visual = list(captioner.projector(val_feats[idx]).unbind(0))
            losses.append(captioner.loss(visual, [val_targets[i] for i in idx]).item() * len(idx))
            captions += [g.text for g in captioner.generate(visual, GenerationConfig(max_new_tokens=40))]
        text_emb = scorer.text_embeddings(captions)
        siglip = scorer.scores(text_emb, val_video_emb).tolist()
    attributes = attribute_scores(captions, [r.get("attributes") for r in val_rows], lang)
    accuracy = attributes["mean"] if attributes else None
    return sum(losses) / len(val_rows), captions, text_emb.numpy(), siglip, accuracy


def train_captioner(cfg: TrainConfig, shared: Path, encoder: VisionEncoder, llm, tokenizer, scorer: Scorer,
                    train_feats, train_rows, val_feats, val_rows, val_video_emb) -> list[EpochStats]:
    out = Path(cfg.out) / cfg.run
    out.mkdir(parents=True, exist_ok=True)
    save_dtype = getattr(torch, cfg.save_dtype)
    projector = build_projector(cfg.projector, encoder.width, llm.get_input_embeddings().embedding_dim,
                                encoder.tokens_per_frame, **cfg.projector_options)
    captioner = Captioner(encoder, projector, llm, tokenizer, "<video>\n")
    targets = [tokenizer(r["caption"], add_special_tokens=False)["input_ids"] for r in train_rows]
    val_targets = [tokenizer(r["caption"], add_special_tokens=False)["input_ids"] for r in val_rows]
    monitor = DiversityMonitor(None, val_rows, ids=[r.get("id") or str(i) for i, r in enumerate(val_rows)],
                               references=[r["caption"] for r in val_rows],
                               video_paths=[r["abs_path"] for r in val_rows], out_dir=out,
                               patience=cfg.stop_on_collapse, ignore_first=cfg.collapse_warmup,
                               thresholds=GuardThresholds())
    history: list[EpochStats] = []
    rng = random.Random(cfg.seed)
    best, bad_epochs, epoch_no = float("inf"), 0, 0
    for stage, epochs, lr in ((1, cfg.stage1_epochs, cfg.stage1_lr), (2, cfg.stage2_epochs, cfg.stage2_lr)):
        for p in llm.parameters():
            p.requires_grad_(stage == 2)
        params = list(projector.parameters()) + (list(llm.parameters()) if stage == 2 else [])
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
        sched = cosine_schedule(opt, epochs * math.ceil(len(train_rows) / cfg.batch_size), cfg.warmup_ratio)
        bad_epochs = 0
        for _ in range(epochs):
            epoch_no += 1
            start = time.perf_counter()
            captioner.train()
            total = 0.0
            bar = tqdm(list(batches(len(train_rows), cfg.batch_size, rng)), desc=f"stage{stage} epoch {epoch_no}",
                       leave=False)
            for idx in bar:
                visual = list(projector(train_feats[idx]).unbind(0))
                loss = captioner.loss(visual, [targets[i] for i in idx])
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                sched.step()
                total += loss.item() * len(idx)
                bar.set_postfix(loss=f"{loss.item():.3f}")
            val_loss, captions, text_emb, siglip, accuracy = validate(
                captioner, val_feats, val_rows, val_targets, scorer, val_video_emb, 32, cfg.lang)
            judged = monitor.observe(captions, scores=siglip, text_emb=text_emb, video_emb=val_video_emb.numpy(),
                                     epoch=epoch_no)
            ckpt = out / f"epoch-{epoch_no}"
            llm_rel = os.path.relpath(shared / "llm", ckpt)
            if stage == 2:   # the LLM changed: this epoch carries its own copy
                write_llm_dir(llm, tokenizer, ckpt / "llm", dtype=save_dtype)
                llm_rel = "llm"
            siglip_rel = os.path.relpath(shared / "siglip", ckpt)
            write_checkpoint(ckpt, projector, cfg.projector, VisionConfig(siglip_rel, cfg.select_layer,
                                                                          cfg.select_feature), llm_rel,
                             scorer=ScorerConfig(path=siglip_rel, tokenizer=siglip_rel),
                             options=cfg.projector_options, num_frames=cfg.num_frames, dtype=save_dtype,
                             info={"run": cfg.run, "stage": stage, "epoch": epoch_no, "seed": cfg.seed,
                                   "val_loss": round(val_loss, 4), "made_by": "capguard train"})
            report = judged.report.to_dict()
            report["modes"] = report["modes"][:3]
            stats = EpochStats(stage, epoch_no, total / len(train_rows), val_loss, report,
                               judged.siglip_mean, accuracy, judged.tripped, str(ckpt),
                               time.perf_counter() - start, judged.reason)
            history.append(stats)
            log.info("epoch %d (stage %d): train %.3f val %.3f | unique %d/%d (%.2f) near %.2f top %.2f | "
                     "siglip %.3f | R@1 %s | attr %s | %s", epoch_no, stage, stats.train_loss, val_loss,
                     report["unique"], report["n"], report["unique_ratio"], report["near_unique_ratio"],
                     report["top_mode_share"], stats.siglip_mean, _fmt(report.get("grounding_r1")), _fmt(accuracy),
                     ",".join(stats.tripped) or "healthy")
            if judged.should_stop:
                break
            if val_loss < best - 1e-4:
                best, bad_epochs = val_loss, 0
            else:
                bad_epochs += 1
                if bad_epochs >= cfg.patience:
                    log.info("early stopping after epoch %d (no val improvement in %d epochs)", epoch_no, bad_epochs)
                    break
        if history and history[-1].stopped:
            break
    (out / "history.json").write_text(json.dumps([asdict(h) for h in history], indent=1, ensure_ascii=False),
                                      encoding="utf-8")
    return history


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"


# ---- driver ---------------------------------------------------------------------------------------

def run(cfg: TrainConfig) -> list[EpochStats]:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    data, shared = Path(cfg.data), Path(cfg.out) / "shared"
    train_rows = read_manifest(data / "train.jsonl", cfg.lang, cfg.limit_train)
    val_rows = read_manifest(data / "val.jsonl", cfg.lang, cfg.limit_val)
    side = 2 * cfg.sizes.image_size
    train_frames = load_frames(train_rows, cfg.num_frames, side)
    val_frames = load_frames(val_rows, cfg.num_frames, side)
    train_caps, val_caps = [r["caption"] for r in train_rows], [r["caption"] for r in val_rows]

    if cfg.reuse_shared and (shared / "siglip").is_dir() and (shared / "llm").is_dir():
        log.info("reusing the shared encoder/scorer and LM in %s", shared)
        from capguard.models.stack import load_llm

        clip, preprocess_cfg = load_open_clip(shared / "siglip")
        clip = clip.float()
        llm, tokenizer = load_llm(shared / "llm", torch.device("cpu"), torch.float32)
    else:
        tokenizer = train_tokenizer(train_caps, cfg.sizes.vocab_size)
        clip, model_cfg, r1 = train_siglip(cfg, tokenizer, train_frames, train_caps, val_frames, val_caps)
        write_open_clip_dir(clip, model_cfg, shared / "siglip", tokenizer=tokenizer,
                            dtype=getattr(torch, cfg.save_dtype))
        llm = train_lm(cfg, tokenizer, train_caps)
        write_llm_dir(llm, tokenizer, shared / "llm", dtype=getattr(torch, cfg.save_dtype))
        (shared / "README.json").write_text(json.dumps({"siglip_val_r1": r1, "config": asdict(cfg)}, indent=1,
                                                       ensure_ascii=False, default=str), encoding="utf-8")
        # Reload both from disk so training continues from exactly what checkpoints reference.
        clip, preprocess_cfg = load_open_clip(shared / "siglip")
        clip = clip.float()
    clip.requires_grad_(False)
    encoder = VisionEncoder(clip.visual, preprocess_cfg, cfg.select_layer, cfg.select_feature)
    scorer = Scorer(clip, load_tokenizer(shared / "siglip", shared / "siglip", clip.context_length))
    train_feats = encode_all(encoder, train_frames)
    val_feats = encode_all(encoder, val_frames)
    with torch.inference_mode():
        val_video_emb = video_features(clip, preprocess_all(encoder.preprocess, val_frames))
    return train_captioner(cfg, shared, encoder, llm, tokenizer, scorer, train_feats, train_rows,
                           val_feats, val_rows, val_video_emb)
