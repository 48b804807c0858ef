"""A toy training run end to end: data set -> scorer/LM -> captioner epochs -> loadable checkpoints."""

from __future__ import annotations

import json

import pytest

from capguard.models.components import TinySizes
from capguard.models.stack import load_stack
from capguard.models.synth import make_dataset
from capguard.models.train import TrainConfig, run


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    make_dataset(root / "data", n_train=24, n_val=8, seed=3, size=64, seconds=1.0, fps=8)
    cfg = TrainConfig(data=str(root / "data"), out=str(root / "out"), run="toy", num_frames=4,
                      sizes=TinySizes(image_size=32, patch_size=16, vision_width=32, vision_layers=2,
                                      text_width=32, text_layers=1, context_length=32, embed_dim=32,
                                      llm_hidden=32, llm_layers=1, llm_heads=2, vocab_size=300),
                      siglip_epochs=2, lm_epochs=2, stage1_epochs=2, stage2_epochs=2, batch_size=8,
                      stage1_lr=3e-3, stage2_lr=3e-3, patience=10)
    return root, run(cfg)


@pytest.mark.slow
def test_loss_falls_and_every_epoch_is_a_loadable_checkpoint(toy_run):
    root, history = toy_run
    assert [h.epoch for h in history] == [1, 2, 3, 4]
    assert [h.stage for h in history] == [1, 1, 2, 2]
    assert history[-1].train_loss < history[0].train_loss
    for h in history:
        assert 0 <= h.report["unique_ratio"] <= 1 and h.report["n"] == 8
        stack = load_stack(h.checkpoint)
        assert stack.config.info["epoch"] == h.epoch
        assert stack.scorer is not None
    # Stage 1 epochs share the pre-trained LM by relative path; stage 2 epochs carry their own.
    stage1 = json.loads((root / "out" / "toy" / "epoch-1" / "capguard.json").read_text())
    stage2 = json.loads((root / "out" / "toy" / "epoch-3" / "capguard.json").read_text())
    assert stage1["llm"]["path"] == "../../shared/llm" and stage2["llm"]["path"] == "llm"
    assert stage1["vision"]["path"] == "../../shared/siglip"
    assert (root / "out" / "toy" / "history.json").is_file()
    # the monitor's caption files: one per epoch, in the format `capguard evaluate --captions` reads
    from capguard.models.captions_file import read_captions_file

    for h in history:
        rows = read_captions_file(root / "out" / "toy" / f"captions-epoch-{h.epoch}.jsonl").rows
        assert len(rows) == 8 and all(r.video_path.is_file() and r.reference for r in rows)
        assert h.stopped is None   # stop_on_collapse not set: report only


def test_training_pools_a_video_as_the_scorer_does():
    """train.video_features (with autograd, on (N, T, ...) pixels) and Scorer.video_embeddings (flat frames)
    share scorer.pool_frames: the same numbers, and the definition is the normalized mean of normalized frames."""
    import torch
    import torch.nn.functional as F

    from capguard.models.scorer import pool_frames
    from capguard.models.train import video_features

    class Tower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(12, 5)

        def encode_image(self, x):                      # (F, 3, 2, 2) -> (F, 5)
            return self.proj(x.flatten(1))

    torch.manual_seed(0)
    tower, pixels = Tower(), torch.randn(3, 4, 3, 2, 2)     # 3 videos of 4 frames
    pooled = video_features(tower, pixels, batch=2)         # (3, 5), two batches
    frames = tower.encode_image(pixels.flatten(0, 1))
    reference = F.normalize(F.normalize(frames, dim=-1).view(3, 4, -1).mean(1), dim=-1)
    torch.testing.assert_close(pooled, reference)
    torch.testing.assert_close(pool_frames(frames, [4, 4, 4]), reference)
    pooled.sum().backward()                                 # training needs the gradient
    assert tower.proj.weight.grad is not None
