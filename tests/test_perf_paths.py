"""The throughput changes keep behaviour: exact preprocessing, mixed frame sizes in a batch, prompt cache."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from test_stack import sensitize

from capguard.models.components import init_checkpoint
from capguard.models.encoder import FramePreprocessor
from capguard.models.stack import load_stack


def pil_preprocess(pre: FramePreprocessor, frames: torch.Tensor) -> torch.Tensor:
    """The ground truth: what open_clip's transforms and transformers' image processors do, frame by frame
    with PIL (resize the uint8 RGB image, crop or pad, scale to [0, 1], normalize)."""
    from PIL import Image

    out = []
    for frame in frames.numpy():
        h, w = frame.shape[:2]
        th, tw = pre.size
        if pre.resize_mode == "squash":
            new_h, new_w = th, tw
        else:
            scale = max(th / h, tw / w) if pre.resize_mode == "shortest" else min(th / h, tw / w)
            new_h, new_w = round(h * scale), round(w * scale)
        resample = Image.BICUBIC if pre.interpolation == "bicubic" else Image.BILINEAR
        x = torch.from_numpy(np.asarray(Image.fromarray(frame).resize((new_w, new_h), resample))).permute(2, 0, 1)
        if pre.resize_mode == "longest":
            x = F.pad(x, (0, tw - new_w, 0, th - new_h))
        top, left = (x.shape[-2] - th) // 2, (x.shape[-1] - tw) // 2
        out.append(x[:, top:top + th, left:left + tw])
    return (torch.stack(out).float() / 255.0 - pre.mean) / pre.std


@pytest.mark.parametrize("mode", ["squash", "shortest", "longest"])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("frame_hw", [(72, 128), (64, 64), (30, 20), (128, 128)])
def test_frame_preprocessing_is_what_pil_gives(mode, interpolation, frame_hw):
    """Within two uint8 levels of PIL on every pixel and nearly always equal, also on noise (where a float resize
    strayed up to 24 levels: bicubic overshoots, and PIL clips between its passes); a batch gives what its
    frames give one by one."""
    pre = FramePreprocessor({"size": 64, "resize_mode": mode, "interpolation": interpolation,
                             "mean": [0.48, 0.45, 0.40], "std": [0.26, 0.26, 0.27]})
    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (5, *frame_hw, 3), dtype=np.uint8))
    got, want = pre(frames), pil_preprocess(pre, frames)
    levels = ((got - want) * pre.std * 255).abs()           # in uint8 levels
    assert got.shape == want.shape == (5, 3, 64, 64) and got.is_contiguous()
    assert levels.max() < 2.0 + 1e-3 and levels.mean() < 0.02
    assert torch.equal(torch.cat([pre(frames[i:i + 1]) for i in range(5)]), got)


@pytest.fixture(scope="module")
def stack_dirs(tmp_path_factory):
    """A stack whose scorer shares the captioner's tower, and one whose scorer is a separate model."""
    root = tmp_path_factory.mktemp("perf")
    shared = init_checkpoint(root / "shared", "mlp2x_gelu", seed=3)
    own = root / "own"
    shutil.copytree(shared, own)
    shutil.copytree(own / "siglip", own / "scorer")
    manifest = json.loads((own / "capguard.json").read_text())
    manifest["scorer"]["path"] = "scorer"
    (own / "capguard.json").write_text(json.dumps(manifest))
    return {"shared": shared, "own": own}


def sensitized(directory):
    """A stack whose random-init weights are widened so each video gets its own tokens."""
    return sensitize(load_stack(directory, device="cpu"))


def clips(seed: int, sizes) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8) for t, h, w in sizes]


@pytest.mark.parametrize("scorer", ["shared", "own"])
def test_a_batch_may_mix_frame_sizes_and_counts(stack_dirs, scorer):
    """Frames of different sizes once failed the whole batch (one resize call for all of them)."""
    stack = sensitized(stack_dirs[scorer])
    assert (stack.scorer_preprocess is None) == (scorer == "shared")
    videos = clips(2, [(8, 40, 56), (8, 48, 48), (3, 72, 128)])
    together, _ = stack.caption(videos, max_new_tokens=[6, 6, 6])
    alone = [stack.caption([v], max_new_tokens=[6])[0][0] for v in videos]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert len({tuple(o.token_ids) for o in together}) > 1   # the videos really differ
    assert [o.score for o in together] == pytest.approx([o.score for o in alone], abs=1e-5)


def test_prompt_embeddings_are_cached_at_inference_only(stack_dirs):
    cap = load_stack(stack_dirs["shared"], device="cpu", with_scorer=False).captioner
    with torch.inference_mode():
        first = cap.prompt_embeddings()
        assert cap.prompt_embeddings()[0] is first[0]                 # reused, not recomputed
    embedding = cap.llm.get_input_embeddings().weight
    with torch.no_grad():
        embedding.add_(1.0)                                            # an optimizer step does this in place
    with torch.inference_mode():
        after = cap.prompt_embeddings()
    assert after[0] is not first[0] and torch.equal(after[0], first[0] + 1.0)
    trained = cap.prompt_embeddings()                                  # autograd on: fresh, with a graph
    assert trained[0].requires_grad and trained[0] is not after[0]


def test_the_server_batches_uploads_of_different_frame_sizes_together(server_settings, tmp_path):
    from videomaker import make_video

    from capguard.server.app import create_app

    paths = [make_video(tmp_path / f"v{i}.mp4", num_frames=12, size=size)
             for i, size in enumerate([(64, 48), (48, 64), (96, 54), (80, 80)])]   # four aspect ratios

    def post(client, path):
        with open(path, "rb") as f:
            return client.post("/caption", files={"video": ("v.mp4", f.read(), "video/mp4")},
                               data={"max_new_tokens": "3"})

    with TestClient(create_app(server_settings(decode_workers=2, max_wait_ms=500))) as client, \
            ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda p: post(client, p), paths))
        metrics = client.get("/metrics").text
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    count = next(float(line.split()[-1]) for line in metrics.splitlines()
                 if line.startswith("capguard_batch_size_count"))
    assert count < 4                   # at least two differently sized uploads shared a batch
