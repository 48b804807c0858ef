"""Checkpoints from the formats people have: transformers vision towers, `capguard import` of LLaVA and
LLaVA-Onevision checkpoints (both key layouts), Honeybee's convolutional C-Abstractor.

Every source model is a tiny random-init instance of transformers' own classes, saved with
save_pretrained; nothing is downloaded.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from capguard.models.components import BOOTSTRAP_TEXT, init_checkpoint, train_tokenizer, write_checkpoint
from capguard.models.config import CheckpointConfig, CheckpointError, VisionConfig
from capguard.models.projector import build_projector
from capguard.models.stack import load_stack
from capguard.models.weights import save_state_dict

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
              patch_size=8)   # 4 x 4 = 16 patches per frame
TEXT_HIDDEN = 48              # differs from the tower's 32, so a swapped projector dimension cannot pass
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
                 "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
                 "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
# old layout (transformers < 4.52, and what transformers 5 still writes) -> the new one
NEW_LAYOUT = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
              ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."),
              ("image_newline", "model.image_newline"))


@pytest.fixture(scope="module")
def tokenizer():
    tok = train_tokenizer(BOOTSTRAP_TEXT, 300)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def text_config(kind: str, vocab: int):
    """Llama with its own lm_head; Qwen2 with the head tied to the embeddings (one tensor on disk)."""
    from transformers import LlamaConfig, Qwen2Config

    cls = LlamaConfig if kind == "llama" else Qwen2Config
    return cls(hidden_size=TEXT_HIDDEN, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=512,
               tie_word_embeddings=kind != "llama")


def sensitize(model: torch.nn.Module, seed: int) -> None:
    """Random-init std 0.02 weights make an LLM ignore its input; wider ones make each video its own caption."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)


def make_llava(out, tokenizer, onevision: bool = False):
    """A tiny LlavaForConditionalGeneration (CLIP tower, Llama) or LlavaOnevision (SigLIP, Qwen2) dir, with
    its tokenizer and image processor, as a user's hub snapshot looks."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        SiglipImageProcessor,
        SiglipVisionConfig,
    )

    image_id = tokenizer.convert_tokens_to_ids("<image>")
    torch.manual_seed(3)
    if onevision:
        config = LlavaOnevisionConfig(vision_config=SiglipVisionConfig(**VISION, vision_use_head=False),
                                      text_config=text_config("qwen2", len(tokenizer)), image_token_index=image_id,
                                      video_token_index=image_id)
        model, processor = LlavaOnevisionForConditionalGeneration(config), SiglipImageProcessor(
            size={"height": 32, "width": 32})
    else:
        config = LlavaConfig(vision_config=CLIPVisionConfig(**VISION), text_config=text_config("llama", len(tokenizer)),
                             image_token_index=image_id)
        model, processor = LlavaForConditionalGeneration(config), CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    sensitize(model, 4)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    return model.eval()


def rewrite_keys(directory, rename) -> dict[str, torch.Tensor]:
    """Rewrite model.safetensors with ``rename(key) -> key | None`` (None drops it); returns the new tensors."""
    path = directory / "model.safetensors"
    state = {}
    for key, value in load_file(str(path)).items():
        new = rename(key)
        if new is not None:
            state[new] = value
    save_file(state, str(path), metadata={"format": "pt"})
    return state


def to_new_layout(key: str) -> str:
    for old, new in NEW_LAYOUT:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def frames(seed: int, count: int = 2, side: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, side, side, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def llava(tmp_path_factory, tokenizer):
    src = tmp_path_factory.mktemp("llava")
    return src, make_llava(src, tokenizer)


# transformers vision towers


def tower_checkpoint(root, tower_dir, select_feature="patch"):
    """A checkpoint whose encoder is a transformers tower dir and whose LLM is init_checkpoint's."""
    base = init_checkpoint(root / "base", "linear", seed=2)
    llm_hidden = json.loads((base / "llm" / "config.json").read_text())["hidden_size"]
    projector = build_projector("mlp2x_gelu", VISION["hidden_size"], llm_hidden)
    vision = VisionConfig(path=str(tower_dir), select_feature=select_feature, type="transformers")
    return write_checkpoint(root / "ckpt", projector, "mlp2x_gelu", vision, "../base/llm")


@pytest.mark.parametrize("select_feature, tokens", [("patch", 16), ("cls_patch", 17)])
def test_clip_tower_gives_llava_features(tmp_path, select_feature, tokens):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    tower = CLIPVisionModel(CLIPVisionConfig(**VISION)).eval()
    tower.save_pretrained(str(tmp_path / "clip"))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        str(tmp_path / "clip"))
    stack = load_stack(tower_checkpoint(tmp_path, tmp_path / "clip", select_feature), device="cpu")
    encoder = stack.captioner.encoder
    assert (encoder.tokens_per_frame, encoder.width) == (tokens, 32)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]   # (2, 17, 32)
        got = encoder(pixels)
    torch.testing.assert_close(got, want[:, 1:] if select_feature == "patch" else want)
    outputs, _ = stack.caption([frames(0), frames(1, count=3)], max_new_tokens=[4, 4])
    assert len(outputs) == 2 and all(isinstance(o.caption, str) for o in outputs)


@pytest.mark.parametrize("kind, shape", [("clip", (90, 160)), ("clip", (112, 150)), ("siglip", (90, 160))])
def test_preprocessing_matches_the_image_processor(kind, shape):
    """Frames preprocessed from preprocessor_config.json = what the transformers image processor gives (PIL
    resize vs antialiased torch resize: a few thousandths apart on a smooth frame)."""
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    from capguard.models.encoder import FramePreprocessor
    from capguard.models.hf_vision import preprocess_config

    processor = (CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
                 if kind == "clip" else SiglipImageProcessor(size={"height": 48, "width": 48}))
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    frame = (120 + 100 * np.sin(xx / 9)[..., None] + 30 * np.cos(yy / 7)[..., None] * np.array([1, 0.5, -1]))
    frame = frame.clip(0, 255).astype(np.uint8)                        # (H, W, 3), smooth
    want = processor(images=frame, return_tensors="pt")["pixel_values"]
    got = FramePreprocessor(preprocess_config(processor.to_dict(), kind))(torch.from_numpy(frame)[None])
    assert got.shape == want.shape
    assert (got - want).abs().mean() < 0.01 and (got - want).abs().max() < 0.05


def test_tower_from_a_whole_siglip_model_dir(tmp_path):
    """The directory of a whole SiglipModel works: only the text half's keys go unused."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    from capguard.models.hf_vision import load_tower

    model = SiglipModel(SiglipConfig(vision_config=VISION, text_config={**VISION, "vocab_size": 64})).eval()
    model.save_pretrained(str(tmp_path / "siglip"))
    SiglipImageProcessor(size={"height": 32, "width": 32}, resample=2).save_pretrained(str(tmp_path / "siglip"))
    tower, preprocess = load_tower(tmp_path / "siglip")
    assert preprocess["size"] == (32, 32) and preprocess["resize_mode"] == "squash"
    assert preprocess["interpolation"] == "bilinear" and preprocess["mean"] == [0.5, 0.5, 0.5]
    torch.testing.assert_close(tower.state_dict()["embeddings.patch_embedding.weight"],
                               model.vision_model.embeddings.patch_embedding.weight)
    stack = load_stack(tower_checkpoint(tmp_path, tmp_path / "siglip"), device="cpu")
    assert stack.captioner.encoder.tokens_per_frame == 16       # SigLIP has no CLS to drop


def test_tower_dir_without_processor_or_with_stray_keys_fails(tmp_path):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from capguard.models.hf_vision import load_tower

    CLIPVisionModel(CLIPVisionConfig(**VISION)).save_pretrained(str(tmp_path))
    with pytest.raises(CheckpointError, match="preprocessor_config.json is missing"):
        load_tower(tmp_path)
    CLIPImageProcessor().save_pretrained(str(tmp_path))
    rewrite_keys(tmp_path, lambda k: k)
    state = load_file(str(tmp_path / "model.safetensors"))
    save_file({**state, "encoder.stray.weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="encoder.stray.weight"):
        load_tower(tmp_path)


def test_old_manifests_default_to_open_clip(tmp_path):
    ckpt = init_checkpoint(tmp_path / "c", "linear", seed=0)
    data = json.loads((ckpt / "capguard.json").read_text())
    data["vision"].pop("type")
    assert CheckpointConfig.from_dict(data).vision.type == "open_clip"
    data["vision"]["type"] = "timm"
    with pytest.raises(CheckpointError, match="vision.type"):
        CheckpointConfig.from_dict(data)


# capguard import


@pytest.mark.parametrize("layout", ["old", "new"])
def test_import_llava_round_trips_and_matches_transformers(tmp_path, tokenizer, layout):
    from capguard.models.importer import import_llava

    src = tmp_path / "src"
    model = make_llava(src, tokenizer)
    if layout == "new":   # the layout transformers >= 4.52 loads, with the tower's vision_model. level
        state = rewrite_keys(src, lambda k: to_new_layout(k).replace("vision_tower.", "vision_tower.vision_model."))
        assert "model.language_model.embed_tokens.weight" in state and "lm_head.weight" in state
    out = import_llava(src, tmp_path / "out")
    config = CheckpointConfig.load(out)
    assert config.prompt == "USER: <video>\nDescribe this video. ASSISTANT:"
    assert (config.vision.type, config.vision.select_layer, config.vision.select_feature) == (
        "transformers", -2, "patch")
    stack = load_stack(out, device="cpu")
    cap = stack.captioner
    # the weights round-trip
    source = model.state_dict()
    for key, value in cap.llm.state_dict().items():
        torch.testing.assert_close(value, source[key.replace("model.", "model.language_model.", 1)
                                                 if key.startswith("model.") else key], rtol=0, atol=0)
    for key, value in cap.encoder.tower.state_dict().items():
        torch.testing.assert_close(value, source["model.vision_tower." + key], rtol=0, atol=0)
    torch.testing.assert_close(cap.projector[0].weight, model.model.multi_modal_projector.linear_1.weight)
    torch.testing.assert_close(cap.projector[2].bias, model.model.multi_modal_projector.linear_2.bias)
    # one frame through capguard's encoder + projector = transformers' LLaVA image features
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = model.get_image_features(pixel_values=pixels, vision_feature_layer=-2,
                                        vision_feature_select_strategy="default").pooler_output[0]   # (16, 48)
        got = cap.project(cap.visual_tokens(pixels, [1]))[0]
    torch.testing.assert_close(got, want)
    outputs, _ = stack.caption([frames(0), frames(1)], max_new_tokens=[6, 6])
    assert all(o.caption and o.num_tokens > 0 for o in outputs)


def test_imported_captions_are_transformers_llava_captions(tmp_path, llava, tokenizer):
    """One frame: capguard's caption of the imported checkpoint = the greedy tokens of transformers' own
    LlavaForConditionalGeneration on the same pixels and the same prompt (BOS, template, image tokens)."""
    from capguard.models.importer import import_llava

    src, model = llava
    stack = load_stack(import_llava(src, tmp_path / "out"), device="cpu")
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    before, after = "USER: ", "\nDescribe this video. ASSISTANT:"
    for seed in range(3):
        frame = frames(seed, count=1)
        pixels = stack.pixels([frame], stack.captioner.encoder.preprocess)      # (1, 3, 32, 32)
        ids = (tokenizer(before)["input_ids"] + [image_id] * 16
               + tokenizer(after, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids]), pixel_values=pixels, max_new_tokens=8,
                                 do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
        want = out[:out.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in out else out
        got = stack.caption([frame], max_new_tokens=[8], score=False)[0][0]
        assert got.token_ids == want and len(want) > 0


def test_import_keeps_each_parts_dtype(tmp_path, llava):
    """A bf16 LM beside a fp32 tower and projector: each part is written in its own dtype, bit for bit."""
    import shutil

    from capguard.models.importer import import_llava

    src = tmp_path / "src"
    shutil.copytree(llava[0], src)
    state = load_file(str(src / "model.safetensors"))
    state = {k: v.to(torch.bfloat16) if k.startswith("language_model.") else v for k, v in state.items()}
    save_file(state, str(src / "model.safetensors"))
    out = import_llava(src, tmp_path / "out")
    llm = load_file(str(out / "llm" / "model.safetensors"))
    tower = load_file(str(out / "vision" / "model.safetensors"))
    assert {v.dtype for v in llm.values()} == {torch.bfloat16}
    assert {v.dtype for v in tower.values() if v.is_floating_point()} == {torch.float32}
    assert torch.equal(llm["model.norm.weight"], state["language_model.model.norm.weight"])
    assert torch.equal(load_file(str(out / "projector.safetensors"))["0.weight"],
                       state["multi_modal_projector.linear_1.weight"])


def test_imported_stack_runs_in_bfloat16(tmp_path, llava):
    """The dtype a GPU gets (bf16), on CPU: tower, projector and LLM all follow llm.dtype."""
    from capguard.models.importer import import_llava

    out = import_llava(llava[0], tmp_path / "out")
    config = CheckpointConfig.load(out)
    config.llm.dtype = "bfloat16"
    config.save(out)
    stack = load_stack(out, device="cpu")
    assert next(stack.captioner.encoder.tower.parameters()).dtype == torch.bfloat16
    outputs, _ = stack.caption([frames(0), frames(1, count=3)], max_new_tokens=[4, 4])
    assert all(o.num_tokens > 0 for o in outputs)


def test_import_onevision_drops_image_newline_and_keeps_all_tokens(tmp_path, tokenizer, caplog):
    from capguard.models.importer import import_llava

    src = tmp_path / "src"
    model = make_llava(src, tokenizer, onevision=True)
    rewrite_keys(src, to_new_layout)
    with caplog.at_level("WARNING", logger="capguard.models.importer"):
        out = import_llava(src, tmp_path / "out")
    assert "image_newline" in caplog.text
    config = CheckpointConfig.load(out)
    assert config.info["dropped"] == ["image_newline"]
    assert (config.vision.select_layer, config.vision.select_feature) == (-1, "cls_patch")  # "full" strategy
    stack = load_stack(out, device="cpu")
    assert stack.captioner.encoder.tokens_per_frame == 16
    torch.testing.assert_close(stack.captioner.llm.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)
    outputs, _ = stack.caption([frames(2)], max_new_tokens=[5])
    assert outputs[0].num_tokens > 0


@pytest.mark.parametrize("edit, extra, message", [
    (lambda k: k, "stray.weight", "belong to no part of a LLaVA model: stray.weight"),
    (lambda k: k, "image_newline", "image_newline in a llava checkpoint"),
    (lambda k: None if k == "multi_modal_projector.linear_2.bias" else k, None, "missing keys 2.bias"),
    (lambda k: None if k == "language_model.model.norm.weight" else k, None, "missing keys model.norm.weight"),
])
def test_import_is_strict(tmp_path, llava, edit, extra, message):
    import shutil

    from capguard.models.importer import import_llava

    src = tmp_path / "src"
    shutil.copytree(llava[0], src)
    state = rewrite_keys(src, edit)
    if extra:
        save_file({**state, extra: torch.zeros(TEXT_HIDDEN)}, str(src / "model.safetensors"))
    with pytest.raises(CheckpointError, match=message):
        import_llava(src, tmp_path / "out")
    assert not (tmp_path / "out" / "capguard.json").exists()


def test_import_refuses_what_it_cannot_reproduce(tmp_path, llava):
    import shutil

    from capguard.models.importer import import_llava

    src = tmp_path / "src"
    shutil.copytree(llava[0], src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "vision_feature_layer": [-2, -5]}))
    with pytest.raises(CheckpointError, match="several layers"):
        import_llava(src, tmp_path / "out")
    (src / "config.json").write_text(json.dumps({**config, "model_type": "llava_next_video"}))
    with pytest.raises(CheckpointError, match="not supported"):
        import_llava(src, tmp_path / "out")


def test_import_checks_shapes(tmp_path, llava):
    import shutil

    from capguard.models.importer import import_llava

    src = tmp_path / "src"
    shutil.copytree(llava[0], src)
    rewrite_keys(src, lambda k: k)
    state = load_file(str(src / "model.safetensors"))
    state["multi_modal_projector.linear_1.weight"] = torch.zeros(TEXT_HIDDEN, 31)
    save_file(state, str(src / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"shape mismatch: 0.weight checkpoint \(48, 31\) vs model \(48, 32\)"):
        import_llava(src, tmp_path / "out")


def test_cli_import_then_caption(tmp_path, llava, capsys):
    from videomaker import make_video

    from capguard.server.cli import main

    out = tmp_path / "imported"
    assert main(["import", str(llava[0]), "--out", str(out), "--instruction", "What happens?"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"] == str(out)
    assert "What happens?" in CheckpointConfig.load(out).prompt
    video = make_video(tmp_path / "clip.mp4", num_frames=12, size=(48, 32))
    assert main(["caption", str(video), "--checkpoint", str(out), "--max-new-tokens", "5"]) == 0
    line = json.loads(capsys.readouterr().out.splitlines()[0])
    assert isinstance(line["caption"], str) and line["scores"]["siglip"] is None and len(line["fingerprint"]) == 64
    assert main(["import", str(llava[0]), "--out", str(out)]) == 2        # not empty: refused, one line
    assert "pass --force" in capsys.readouterr().err
    scorer = init_checkpoint(tmp_path / "base", "linear", seed=0) / "siglip"
    assert main(["import", str(llava[0]), "--out", str(out), "--force", "--scorer", str(scorer)]) == 0
    assert CheckpointConfig.load(out).scorer.path == "../base/siglip"
    capsys.readouterr()
    assert main(["caption", str(video), "--checkpoint", str(out), "--max-new-tokens", "5"]) == 0
    assert 0 <= json.loads(capsys.readouterr().out.splitlines()[0])["scores"]["siglip"] <= 1
    assert main(["import", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert main(["import", str(llava[0]), "--out", str(tmp_path / "x"), "--scorer", str(tmp_path)]) == 2
    assert "not an open_clip model directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["import", str(llava[0]), "--out", str(tmp_path / "x"), "--num-frames", "0"])
    assert exit_.value.code == 2 and "--num-frames" in capsys.readouterr().err


# Honeybee's C-Abstractor

HONEYBEE_OPTIONS = {"num_queries": 4, "hidden_dim": 24, "depth": 1, "mlp_depth": 2}


def honeybee_state(vision_dim: int, llm_dim: int, tokens: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A projector state dict under Honeybee's own names (what its checkpoints hold under ``abstractor.``)."""
    torch.manual_seed(seed)
    module = build_projector("honeybee-c-abstractor", vision_dim, llm_dim, tokens, **HONEYBEE_OPTIONS)
    return {"abstractor." + k: v.clone() for k, v in module.state_dict().items()}


def test_honeybee_key_names_are_honeybees():
    keys = set(honeybee_state(64, 32, 16))
    for key in ("abstractor.pos_emb", "abstractor.net.0.b1.conv1.conv.weight", "abstractor.net.0.b1.conv1.bn.weight",
                "abstractor.net.0.b1.se.fc1.weight", "abstractor.net.0.b1.downsample.conv.weight",
                "abstractor.net.2.b1.conv3.conv.weight", "abstractor.readout.0.weight", "abstractor.readout.2.bias"):
        assert key in keys, key
    assert not any(k.startswith("abstractor.net.1.") for k in keys)    # the pooling layer holds no weights


def test_honeybee_runs_per_frame():
    proj = build_projector("honeybee-c-abstractor", 64, 32, 16, **HONEYBEE_OPTIONS).eval()
    x = torch.randn(2, 3 * 16, 64)                                      # (B, T*N, D): 3 frames of a 4x4 grid
    with torch.no_grad():
        out = proj(x)                                                   # (B, T*Q, D_llm)
        one = proj(x[:, 16:32])
    assert out.shape == (2, 3 * 4, 32)
    torch.testing.assert_close(out[:, 4:8], one)
    with pytest.raises(ValueError, match="square"):
        build_projector("honeybee-c-abstractor", 64, 32, 17)
    assert type(build_projector("resampler", 64, 32, num_queries=4, num_heads=4)).__name__ == "CAbstractor"


def test_honeybee_matches_its_composition_written_out():
    """One frame through the module = Honeybee's forward composed by hand from timm's RegStage: pos_emb added,
    (N, D) laid out row-major on the g x g grid, stage, pool, stage, back to (Q, H), MLP readout."""
    from functools import partial

    from timm.layers import LayerNorm2d
    from timm.models.regnet import RegStage

    proj = build_projector("honeybee-c-abstractor", 64, 32, 16, **HONEYBEE_OPTIONS).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        proj.pos_emb.normal_()                                          # visible, unlike trunc_normal(0.02)
    stage = partial(RegStage, stride=1, dilation=1, act_layer=torch.nn.SiLU, norm_layer=LayerNorm2d)
    net = torch.nn.Sequential(stage(1, 64, 24), torch.nn.AdaptiveAvgPool2d((2, 2)), stage(1, 24, 24))
    readout = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.SiLU(), torch.nn.Linear(32, 32))
    state = proj.state_dict()
    net.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
    readout.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("readout.")})
    x = torch.randn(1, 16, 64)
    with torch.no_grad():
        grid = (x + state["pos_emb"]).reshape(1, 4, 4, 64).permute(0, 3, 1, 2)   # b (h w) d -> b d h w
        want = readout(net.eval()(grid).permute(0, 2, 3, 1).reshape(1, 4, 24))     # b d h w -> b (h w) d
        torch.testing.assert_close(proj(x), want)


def test_honeybee_checkpoint_loads_strictly_and_captions(tmp_path):
    ckpt = init_checkpoint(tmp_path / "hb", "linear", seed=0)          # open_clip tower: width 64, 16 tokens/frame
    config = CheckpointConfig.load(ckpt)
    config.projector.type, config.projector.options = "honeybee-c-abstractor", dict(HONEYBEE_OPTIONS)
    config.projector.weights = "honeybee.safetensors"
    config.save(ckpt)
    state = honeybee_state(64, 64, 16, seed=5)
    save_state_dict(state, ckpt / "honeybee.safetensors")
    stack = load_stack(ckpt, device="cpu")
    own = stack.captioner.projector.state_dict()
    assert set(own) == {k[len("abstractor."):] for k in state}
    for key, value in state.items():
        torch.testing.assert_close(own[key[len("abstractor."):]], value, rtol=0, atol=0)
    outputs, _ = stack.caption([frames(0), frames(1, count=3)], max_new_tokens=[4, 4])
    assert all(isinstance(o.caption, str) for o in outputs)
    save_state_dict({**state, "abstractor.query": torch.zeros(1)}, ckpt / "honeybee.safetensors")
    with pytest.raises(CheckpointError, match="unexpected keys query"):
        load_stack(ckpt, device="cpu")
    save_state_dict({k: v for k, v in state.items() if "readout.2" not in k}, ckpt / "honeybee.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys readout.2.bias, readout.2.weight"):
        load_stack(ckpt, device="cpu")


def test_cli_names_match_the_builder():
    from capguard.models.projector import ALIASES, PROJECTOR_TYPES
    from capguard.server.cli import PROJECTORS

    assert set(PROJECTORS) == {*PROJECTOR_TYPES, *ALIASES}


def test_init_checkpoint_with_honeybee_captions(tmp_path, capsys):
    from capguard.server.cli import main

    options = json.dumps({"num_queries": 4, "hidden_dim": 16, "depth": 1})
    assert main(["init-checkpoint", str(tmp_path / "hb"), "--projector", "honeybee-c-abstractor",
                 "--options", options]) == 0
    stack = load_stack(tmp_path / "hb", device="cpu")
    visual = stack.captioner.project(stack.captioner.visual_tokens(
        stack.pixels([frames(0, count=3)], stack.captioner.encoder.preprocess), [3]))
    assert visual[0].shape == (3 * 4, 64)                                # T * num_queries tokens
    outputs, _ = stack.caption([frames(0, count=3)], max_new_tokens=[3])
    assert isinstance(outputs[0].caption, str)
