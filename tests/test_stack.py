"""The captioning core: checkpoint round trips, strict loading, LLaVA import, batching, scoring."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from capguard.models.captioner import IGNORE_INDEX
from capguard.models.config import CheckpointConfig, CheckpointError
from capguard.models.projector import build_projector
from capguard.models.stack import ComponentCache, load_stack
from capguard.models.weights import read_state_dict, save_state_dict

PROJECTORS = ["linear", "mlp2x_gelu", "c-abstractor"]


def sensitize(stack, seed: int = 0):
    """Random-init LLMs ignore their input (std 0.02 weights): widen the weights so each video
    yields its own tokens, making comparisons between code paths meaningful."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in stack.captioner.projector.parameters():
            p.normal_(0, 0.3)
        for p in stack.captioner.llm.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return stack


def flat_videos(levels, frames: int = 8) -> list[np.ndarray]:
    return [np.full((frames, 40, 56, 3), level, dtype=np.uint8) for level in levels]


def videos(n: int, frames: int = 8, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (frames, 40, 56, 3), dtype=np.uint8) for _ in range(n)]


@pytest.mark.parametrize("projector", PROJECTORS)
def test_save_load_round_trip_gives_identical_outputs(projector_stacks, projector, tmp_path):
    a = load_stack(projector_stacks[projector])
    copy = tmp_path / "copy"
    shutil.copytree(projector_stacks[projector], copy)
    b = load_stack(copy)
    assert a.fingerprint == b.fingerprint          # renaming a checkpoint keeps its fingerprint
    clips = videos(2)
    out_a, _ = a.caption(clips, max_new_tokens=[12, 12])
    out_b, _ = b.caption(clips, max_new_tokens=[12, 12])
    assert [o.token_ids for o in out_a] == [o.token_ids for o in out_b]
    assert [o.caption for o in out_a] == [o.caption for o in out_b]
    np.testing.assert_allclose([o.score for o in out_a], [o.score for o in out_b], rtol=1e-6)
    assert all(0.0 <= o.score <= 1.0 for o in out_a)


def test_fingerprint_changes_with_any_weight(projector_stacks, tmp_path):
    copy = tmp_path / "changed"
    shutil.copytree(projector_stacks["linear"], copy)
    state = read_state_dict(copy / "projector.safetensors")
    state["bias"] = state["bias"] + 1e-3
    save_state_dict(state, copy / "projector.safetensors")
    assert load_stack(copy).fingerprint != load_stack(projector_stacks["linear"]).fingerprint


def test_shared_components_are_loaded_once(projector_stacks, tmp_path):
    cache = ComponentCache()
    epoch = tmp_path / "epoch2"
    epoch.mkdir()
    shutil.copy(projector_stacks["linear"] / "projector.safetensors", epoch)
    config = CheckpointConfig.load(projector_stacks["linear"])
    config.vision.path = config.llm.path = str(projector_stacks["linear"] / "siglip")
    config.llm.path = str(projector_stacks["linear"] / "llm")
    config.scorer.path = config.scorer.tokenizer = str(projector_stacks["linear"] / "siglip")
    config.save(epoch)
    a = load_stack(projector_stacks["linear"], cache=cache)
    b = load_stack(epoch, cache=cache)
    assert a.captioner.llm is b.captioner.llm
    assert a.captioner.encoder.visual is b.captioner.encoder.visual
    assert a.scorer_preprocess is None  # the scorer reuses the captioner's forward pass


def test_strict_loading_names_the_problem(projector_stacks, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(projector_stacks["mlp2x_gelu"], bad)
    state = read_state_dict(bad / "projector.safetensors")
    state["2.weight"] = state["2.weight"][:-1]        # shape mismatch
    del state["0.bias"]                                # missing
    state["extra.weight"] = torch.zeros(1)            # unexpected
    save_state_dict(state, bad / "projector.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_stack(bad)
    msg = str(err.value)
    assert "0.bias" in msg and "extra.weight" in msg and "2.weight" in msg and "shape mismatch" in msg


@pytest.mark.parametrize("edit, needle", [
    (lambda c: c.update(schema_version=99), "schema_version"),
    (lambda c: c["projector"].update(type="perceiver"), "unknown projector type"),
    (lambda c: c.update(promt="typo"), "unknown keys"),
    (lambda c: c.update(prompt="no placeholder"), "<video>"),
    (lambda c: c["llm"].update(path="../nowhere"), "does not exist"),
    (lambda c: c.pop("vision"), "missing required section 'vision'"),
    (lambda c: c.update(guard={"near_dup": 0.9}), "unknown guard threshold"),
])
def test_bad_manifests_fail_clearly(projector_stacks, tmp_path, edit, needle):
    bad = tmp_path / "bad"
    shutil.copytree(projector_stacks["linear"], bad)
    manifest = json.loads((bad / "capguard.json").read_text())
    edit(manifest)
    (bad / "capguard.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=needle.replace("(", r"\(")):
        load_stack(bad)


def test_missing_manifest(tmp_path):
    with pytest.raises(CheckpointError, match="capguard.json is missing"):
        load_stack(tmp_path)


def test_llava_mm_projector_bin_loads(projector_stacks, tmp_path):
    """A LLaVA-1.5 mm_projector.bin (keys model.mm_projector.0.weight ...) drops in as the projector."""
    llava = tmp_path / "llava"
    shutil.copytree(projector_stacks["mlp2x_gelu"], llava)
    ours = read_state_dict(llava / "projector.safetensors")
    torch.manual_seed(3)
    theirs = {f"model.mm_projector.{k}": torch.randn_like(v) for k, v in ours.items()}
    torch.save(theirs, llava / "mm_projector.bin")
    manifest = json.loads((llava / "capguard.json").read_text())
    manifest["projector"]["weights"] = "mm_projector.bin"
    (llava / "capguard.json").write_text(json.dumps(manifest))
    stack = load_stack(llava)
    loaded = stack.captioner.projector.state_dict()
    for key, value in theirs.items():
        torch.testing.assert_close(loaded[key.removeprefix("model.mm_projector.")], value)


def test_projector_builder():
    x = torch.randn(2, 3 * 16, 32)                     # (B, T*N, D_vision)
    assert build_projector("linear", 32, 48)(x).shape == (2, 48, 48)
    assert build_projector("mlp2x_gelu", 32, 48)(x).shape == (2, 48, 48)
    cabs = build_projector("c-abstractor", 32, 48, num_queries=5, num_heads=4)
    assert cabs(x).shape == (2, 5, 48)                 # compression: any T*N -> num_queries
    assert cabs(torch.randn(2, 7, 32)).shape == (2, 5, 48)
    with pytest.raises(ValueError, match="unknown projector type"):
        build_projector("qformer", 32, 48)
    with pytest.raises(ValueError, match="takes no options"):
        build_projector("linear", 32, 48, num_queries=4)


@pytest.mark.parametrize("projector", PROJECTORS)
def test_batched_generation_equals_one_by_one(projector_stacks, projector):
    """Left padding must not change any caption: mixed frame counts force padding for linear/MLP."""
    stack = sensitize(load_stack(projector_stacks[projector], with_scorer=False))
    clips = flat_videos([0, 180]) + flat_videos([250], frames=3)
    batched, _ = stack.caption(clips, max_new_tokens=[10, 6, 10])
    single = [stack.caption([c], max_new_tokens=[n])[0][0] for c, n in zip(clips, [10, 6, 10], strict=True)]
    assert [o.token_ids for o in batched] == [o.token_ids for o in single]
    assert [o.caption for o in batched] == [o.caption for o in single]
    assert len({tuple(o.token_ids) for o in batched}) > 1   # the videos really differ
    assert batched[1].num_tokens <= 6


def test_training_inputs_label_only_the_caption(projector_stacks):
    stack = load_stack(projector_stacks["linear"], with_scorer=False)
    cap = stack.captioner
    blocks = cap.visual_tokens(stack.pixels(videos(2, frames=2), cap.encoder.preprocess), [2, 2])
    visual = cap.project(blocks)
    targets = [[10, 11, 12], [13]]
    embeds, mask, positions, labels = cap.build_inputs(visual, targets)
    assert embeds.shape[:2] == mask.shape == labels.shape
    assert labels[0][labels[0] != IGNORE_INDEX].tolist() == [10, 11, 12, cap.eos_id]
    assert labels[1][labels[1] != IGNORE_INDEX].tolist() == [13, cap.eos_id]
    assert mask[1, :2].tolist() == [0, 0] and positions[1, mask[1].argmax()].item() == 0   # left padded
    loss = cap.loss(visual, targets)
    loss.backward()
    assert torch.isfinite(loss) and cap.projector.weight.grad is not None


def test_scorer_prefers_the_caption_that_matches(projector_stacks):
    """Scores are monotone in similarity: the caption whose embedding is the video's wins."""
    stack = load_stack(projector_stacks["linear"])
    scorer = stack.scorer
    texts = scorer.text_embeddings(["회색 건물", "a red hanok at night"])
    video = texts[1:2].repeat(2, 1)                    # a video that looks like caption 1
    scores = scorer.scores(texts, video)
    assert scores[1] > scores[0]


@pytest.mark.slow   # a fresh interpreter imports torch, transformers and open_clip: 30 s on 2 busy cores
def test_importing_models_loads_no_web_stack():
    """Every module of capguard.models, found by listing the package (a new one is covered by itself),
    imports in a notebook or a training loop without fastapi, prometheus_client, uvicorn or the server."""
    code = ("import pkgutil, sys, importlib, capguard.models as pkg; "
            "names = [m.name for m in pkgutil.walk_packages(pkg.__path__, 'capguard.models.')]; "
            "[importlib.import_module(n) for n in names]; "
            "bad = [m for m in ('fastapi', 'starlette', 'prometheus_client', 'capguard.server', 'uvicorn') "
            "if m in sys.modules]; "
            "print(len(names), names, bad); sys.exit(1 if bad or len(names) < 15 else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_loading_a_checkpoint_logs_no_false_warning(projector_stacks, caplog):
    """open_clip's "No pretrained weights loaded ... initialized randomly" is false here (the weights are
    loaded strictly right after): a load, scorer included, must log no warning at all."""
    caplog.set_level(logging.DEBUG)
    stack = load_stack(projector_stacks["linear"])
    assert stack.scorer is not None
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_validating_a_manifest_loads_no_metric_libraries(tmp_path):
    """capguard.json's guard section is checked against models/rules.py, not diversity.py: a training
    script or the CLI that only reads a manifest does not pay for rapidfuzz and sacrebleu."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    manifest = json.loads((Path(root) / "checkpoints" / "collapsed" / "capguard.json").read_text())
    manifest["guard"] = {"min_unique_ratio": 0.4, "near_dup_threshold": 0.95}   # a section to validate
    copy = tmp_path / "collapsed"
    shutil.copytree(Path(root) / "checkpoints" / "collapsed", copy)
    for part in ("vision", "llm", "scorer"):   # the shared components stay where they are
        for key in ("path", "tokenizer"):
            if key in manifest.get(part, {}):
                manifest[part][key] = str((Path(root) / "checkpoints" / "collapsed" / manifest[part][key]).resolve())
    (copy / "capguard.json").write_text(json.dumps(manifest))
    code = ("import sys, capguard.models.config as c; "
            f"cfg = c.CheckpointConfig.load({str(copy)!r}); assert cfg.guard, cfg; "
            "bad = [m for m in ('rapidfuzz', 'sacrebleu', 'capguard.models.diversity') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr


def test_copy_checkpoint_keeps_shared_components_reachable(projector_stacks, tmp_path):
    from capguard.models.components import copy_checkpoint

    shared = projector_stacks["linear"]
    epoch = tmp_path / "runs" / "linear" / "epoch-1"
    epoch.mkdir(parents=True)
    shutil.copy(shared / "projector.safetensors", epoch)
    config = CheckpointConfig.load(shared)
    for section in (config.vision, config.llm):
        section.path = os.path.relpath(shared / section.path, epoch)
    config.scorer.path = config.scorer.tokenizer = os.path.relpath(shared / "siglip", epoch)
    config.save(epoch)
    demo = copy_checkpoint(epoch, tmp_path / "checkpoints" / "demo")
    copied = CheckpointConfig.load(demo)
    assert copied.name == "demo" and copied.vision.path != config.vision.path
    assert load_stack(demo).fingerprint == load_stack(epoch).fingerprint
    # Shipping: the shared dir is copied beside the checkpoints and relinked.
    shutil.copytree(shared, tmp_path / "ship" / "shared")
    shipped = copy_checkpoint(epoch, tmp_path / "ship" / "demo", relink=(shared, tmp_path / "ship" / "shared"))
    assert CheckpointConfig.load(shipped).vision.path == "../shared/siglip"
    assert load_stack(shipped).fingerprint == load_stack(epoch).fingerprint
