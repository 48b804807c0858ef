"""A loaded checkpoint: captioner + optional scorer on one device, and the batched caption pipeline.

``load_stack(dir)`` reads capguard.json, resolves every component path relative to the
checkpoint, builds and strictly loads each part, and fingerprints the weights. Components are
cached by resolved path in a ``ComponentCache`` so checkpoints that share an encoder or LLM
(training epochs) hold one copy in memory, and a scorer on the captioner's own tower reuses its
forward pass. With the vllm engine the LLM runs in vLLM's engine core: the stack keeps only the LLM's
input embeddings and tokenizer (capguard.models.llm_embeddings), not a second copy.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from capguard.models.captioner import Captioner, static_cache_options
from capguard.models.config import MANIFEST_NAME, CheckpointConfig, CheckpointError, GenerationConfig
from capguard.models.encoder import FramePreprocessor, VisionEncoder, frames_to_tensor, load_open_clip
from capguard.models.engines import Engine, resolve_engine
from capguard.models.llm_embeddings import load_input_embeddings, load_llm_tokenizer
from capguard.models.projector import build_projector, projector_state_dict
from capguard.models.scorer import Scorer, load_tokenizer
from capguard.models.weights import fingerprint, load_strict, read_state_dict, weight_files

log = logging.getLogger(__name__)


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto": bf16 on a GPU that has it (fp16 otherwise), fp32 on CPU."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise CheckpointError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16") from None


@dataclass
class ComponentCache:
    """Loaded open_clip models, LLMs and file fingerprints, keyed by resolved path (and device)."""
    open_clip: dict = field(default_factory=dict)
    llms: dict = field(default_factory=dict)
    towers: dict = field(default_factory=dict)     # transformers vision towers
    hashes: dict = field(default_factory=dict)

    def clip_model(self, path: Path, device: torch.device, dtype: torch.dtype):
        key = (path, device, dtype)
        if key not in self.open_clip:
            model, cfg = load_open_clip(path)
            self.open_clip[key] = (model.to(device=device, dtype=dtype), cfg)
        return self.open_clip[key]

    def tower(self, path: Path, device: torch.device, dtype: torch.dtype):
        key = (path, device, dtype)
        if key not in self.towers:
            from capguard.models.hf_vision import load_tower

            model, cfg = load_tower(path, dtype)
            self.towers[key] = (model.to(device), cfg)
        return self.towers[key]

    def llm(self, path: Path, device: torch.device, dtype: torch.dtype):
        key = (path, device, dtype)
        if key not in self.llms:
            self.llms[key] = load_llm(path, device, dtype)
        return self.llms[key]

    def input_embeddings(self, path: Path, device: torch.device, dtype: torch.dtype):
        """(InputEmbeddingsLLM, tokenizer) of an LLM another engine runs: its input embedding table and tokenizer
        only (capguard.models.llm_embeddings), kept in ``llms`` (key + "embed") so evictions by path drop it too.
        When the full LLM is already cached (an hf stack of the same LLM), its table and tokenizer are shared."""
        key = (path, device, dtype, "embed")
        if key not in self.llms:
            full = self.llms.get((path, device, dtype))
            module = load_input_embeddings(path, device, dtype, None if full is None else full[0].get_input_embeddings(),
                                           load_full=lambda: load_llm(path, device, dtype)[0])
            self.llms[key] = (module, full[1] if full is not None else _tokenizer(path))
        return self.llms[key]

    def engine(self, name: str, captioner: Captioner, path: Path, device: torch.device, dtype: torch.dtype):
        """The captioner's LLM engine (capguard.models.engines; ``name`` as resolve_engine returns it: "hf" or
        "vllm"); a vllm engine core lives next to its LLM in
        ``llms`` (key + "vllm"), so checkpoints sharing the LLM share it and evicting the LLM ends it."""
        from capguard.models.engines import build_engine

        return build_engine(name, captioner, path, dtype, shared=self.llms, key=(path, device, dtype, "vllm"))

    def file_hash(self, path: Path) -> str:
        st = path.stat()
        key = (path, st.st_size, st.st_mtime_ns)
        if key not in self.hashes:
            self.hashes[key] = fingerprint([path])
        return self.hashes[key]


def load_llm(path: Path, device: torch.device, dtype: torch.dtype):
    """AutoModelForCausalLM + AutoTokenizer from a local dir; any missing/unexpected/mismatched key fails."""
    from transformers import AutoModelForCausalLM

    if not (path / "config.json").is_file():
        raise CheckpointError(f"LLM directory {path} has no config.json (a transformers model dir is expected)")
    tokenizer = _tokenizer(path)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(path), local_files_only=True, dtype=dtype, output_loading_info=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for bad dirs
        raise CheckpointError(f"cannot load the LLM from {path}: {exc}") from exc
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise CheckpointError(f"LLM weights in {path} do not match its config: {problems}")
    return model.to(device).eval(), tokenizer


def _tokenizer(path: Path):
    try:
        return load_llm_tokenizer(path)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for bad dirs
        raise CheckpointError(f"cannot load the LLM's tokenizer from {path}: {exc}") from exc


@dataclass
class CaptionOutput:
    caption: str
    token_ids: list[int]           # generated ids (EOS excluded); len() is the token count
    score: float | None            # scorer's caption-video score (SigLIP probability)
    text_emb: np.ndarray | None    # (E,) normalized, for the grounding metric
    video_emb: np.ndarray | None   # (E,)
    finish_reason: str | None = None   # "stop" | "length" | "repetition" (Generated.finish_reason)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class CaptionStack:
    name: str
    directory: Path
    config: CheckpointConfig
    captioner: Captioner
    scorer: Scorer | None
    scorer_preprocess: FramePreprocessor | None   # None when the scorer shares the captioner's tower
    fingerprint: str
    device: torch.device
    dtype: torch.dtype
    engine: Engine | None = None   # the LLM step (capguard.models.engines); None: the captioner's own HF generate

    @property
    def engine_name(self) -> str:
        return "hf" if self.engine is None else self.engine.name

    @property
    def projector_type(self) -> str:
        return self.config.projector.type

    @property
    def frame_side(self) -> int:
        """Longest side to decode frames at: twice the largest model input, so a 16:9 frame still
        covers the centre crop, and a 4K upload never allocates full-size frames."""
        sizes = [*self.captioner.encoder.preprocess.size]
        if self.scorer_preprocess is not None:
            sizes += [*self.scorer_preprocess.size]
        return 2 * max(sizes)

    def pixels(self, videos: list[np.ndarray], preprocess: nn.Module) -> torch.Tensor:
        """(sum T, 3, S, S) model inputs of a batch: one resize call when all frames share a size, else
        video by video (the same pixels either way: the resize works frame by frame)."""
        if len({v.shape[1:] for v in videos}) > 1:
            return torch.cat([self.pixels([v], preprocess) for v in videos])
        frames = torch.cat([frames_to_tensor(v) for v in videos]).to(self.device)   # (sum T, H, W, 3)
        return preprocess(frames).to(self.dtype)                                   # (sum T, 3, S, S)

    @torch.inference_mode()
    def encode(self, videos: list[np.ndarray], score: bool = True) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Encode and project a batch of (T_i, H, W, 3) videos: ([(Q_i, D_llm)] visual token blocks, (sum T, E)
        pooled frame features when the scorer shares the captioner's tower and ``score``, else None)."""
        counts = [int(v.shape[0]) for v in videos]
        want_pooled = score and self.scorer is not None and self.scorer_preprocess is None
        pixels = self.pixels(videos, self.captioner.encoder.preprocess)
        blocks = self.captioner.visual_tokens(pixels, counts, pooled=want_pooled)
        blocks, image_emb = blocks if want_pooled else (blocks, None)
        return self.captioner.project(blocks), image_emb

    @torch.inference_mode()
    def score(self, videos: list[np.ndarray], texts: list[str], image_emb: torch.Tensor | None = None):
        """Scorer figures of caption i against video i: (scores [B], text_emb (B, E), video_emb (B, E)) as a list
        and numpy arrays; ``image_emb`` (sum T, E) from ``encode`` saves the scorer its own image pass."""
        if image_emb is None:
            image_emb = self.scorer.image_features(self.pixels(videos, self.scorer_preprocess))
        video_emb = self.scorer.video_embeddings(image_emb, [int(v.shape[0]) for v in videos])
        text_emb = self.scorer.text_embeddings(texts)
        scores = self.scorer.scores(text_emb, video_emb).cpu().tolist()
        return scores, text_emb.cpu().numpy(), video_emb.cpu().numpy()

    @torch.inference_mode()
    def caption(self, videos: list[np.ndarray], max_new_tokens: list[int] | None = None,
                generation: GenerationConfig | list[GenerationConfig] | None = None, score: bool = True):
        """Caption a batch of videos given as (T, H, W, 3) uint8 frame arrays.

        generation: the checkpoint's defaults when None; one GenerationConfig for all, or one per video
        (capguard.models.decoding builds a request's).
        Returns (outputs, seconds per stage {"encode", "generate", "score"}); the stages are for the
        whole batch. Frame counts and frame sizes may differ between videos.
        """
        gen = generation or self.config.generation
        t0 = time.perf_counter()
        visual, image_emb = self.encode(videos, score)
        t1 = time.perf_counter()
        generated = (self.engine or self.captioner).generate(visual, gen, max_new_tokens)
        t2 = time.perf_counter()
        scored = self.score(videos, [g.text for g in generated], image_emb) if score and self.scorer else None
        t3 = time.perf_counter()
        return outputs(generated, scored), {"encode": t1 - t0, "generate": t2 - t1, "score": t3 - t2}


def outputs(generated: list, scored: tuple | None) -> list[CaptionOutput]:
    """CaptionOutputs from an engine's Generated rows and ``CaptionStack.score``'s figures (None: no scorer)."""
    scores, text_emb, video_emb = scored if scored is not None else (None, None, None)
    return [CaptionOutput(g.text, g.token_ids,
                          None if scores is None else float(scores[i]),
                          None if text_emb is None else text_emb[i],
                          None if video_emb is None else video_emb[i], g.finish_reason)
            for i, g in enumerate(generated)]


def compile_llm(stack: CaptionStack) -> float:
    """Opt-in speed-up: compile the LLM's forward (``torch.compile``, dynamic shapes) and generate with a static
    KV cache from now on. Returns the seconds spent, warm-up included.

    The warm-up generates for one video, for two, and for two of different lengths (random frames, a few
    tokens): the second call makes the compiled graphs shape-generic and the third compiles the left-padded
    path, so no later batch size or frame count compiles again (a compile on a request would stall it for
    tens of seconds; tested). Tokens are the eager ones (tested). What it gains and what compiling costs per
    load: bench/RESULTS.md ("torch.compile of the LLM"). An LLM shared by several checkpoints is compiled
    once. When compiling fails (no C++ compiler for the CPU backend, a model torch.compile cannot trace),
    the LLM stays eager, a warning says why, and 0.0 is returned. With another engine than hf there is
    nothing here to compile (vLLM compiles its own LLM; capguard holds only its embeddings): 0.0.
    """
    if stack.engine_name != "hf":
        log.info("checkpoint %s: the %s engine runs the LLM; nothing to compile here", stack.name, stack.engine_name)
        return 0.0
    llm, cap = stack.captioner.llm, stack.captioner
    started = time.perf_counter()
    if not getattr(llm, "_capguard_compiled", False):
        llm._capguard_eager = llm.__dict__.get("forward")   # None: the class's own forward
        llm.forward = torch.compile(llm.forward, dynamic=True)
        llm._capguard_compiled = True
    cap.static_cache = True
    try:
        _warm_up(stack)
    except Exception as exc:  # noqa: BLE001 - no C++ compiler, an unsupported model, ...: serve eager instead
        if llm._capguard_eager is None:
            llm.__dict__.pop("forward", None)
        else:
            llm.forward = llm._capguard_eager
        llm._capguard_compiled = False
        cap.static_cache = False
        log.warning("checkpoint %s: compiling the LLM failed (%s: %s); it runs uncompiled", stack.name,
                    type(exc).__name__, str(exc).splitlines()[0][:300] if str(exc) else "")
        return 0.0
    seconds = time.perf_counter() - started
    log.info("checkpoint %s: LLM compiled and warmed up in %.1f s", stack.name, seconds)
    return seconds


def _warm_up(stack: CaptionStack) -> None:
    """compile_llm's warm-up generations (its docstring)."""
    llm, cap = stack.captioner.llm, stack.captioner
    rng = np.random.default_rng(0)
    side = stack.frame_side
    with torch.inference_mode():
        frames = stack.config.num_frames
        for counts in ([frames], [frames, frames], [frames, max(1, frames - 1)]):
            videos = [rng.integers(0, 256, (count, side, side, 3), dtype=np.uint8) for count in counts]
            pixels = stack.pixels(videos, cap.encoder.preprocess)
            visual = cap.project(cap.visual_tokens(pixels, [len(v) for v in videos]))
            embeds, mask, _, _ = cap.build_inputs(visual)
            # min_new_tokens: the one-token decode step must run (and compile) even if EOS comes first
            llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=3, min_new_tokens=3,
                         do_sample=False, pad_token_id=cap.pad_id, eos_token_id=cap.eos_id,
                         **static_cache_options())


def resolve(directory: Path, relative: str, what: str) -> Path:
    path = (directory / relative).resolve()
    if not path.exists():
        raise CheckpointError(f"{directory / MANIFEST_NAME}: {what} path {relative!r} does not exist ({path})")
    return path


def load_projector(config: CheckpointConfig, path: Path, vision_dim: int, llm_dim: int,
                   tokens_per_frame: int | None = None) -> nn.Module:
    try:
        projector = build_projector(config.projector.type, vision_dim, llm_dim, tokens_per_frame,
                                    **config.projector.options)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"projector: {exc}") from exc
    # LLaVA's mm_projector.bin and Honeybee's abstractor.* keys -> ours
    state = projector_state_dict(config.projector.type, read_state_dict(path), path.suffix == ".safetensors",
                                 tokens_per_frame)
    load_strict(projector, state, str(path))
    return projector


def load_stack(directory: str | Path, device: str = "auto", cache: ComponentCache | None = None,
               with_scorer: bool = True, name: str | None = None, engine: str | None = None) -> CaptionStack:
    """engine: "auto" | "hf" | "vllm"; None reads CAPGUARD_ENGINE (default auto: vllm when installed and it
    supports the LLM, else hf)."""
    directory = Path(directory).resolve()
    config = CheckpointConfig.load(directory)
    cache = cache or ComponentCache()
    dev = pick_device(device)
    dtype = pick_dtype(config.llm.dtype, dev)

    vision_path = resolve(directory, config.vision.path, "vision")
    if config.vision.type == "transformers":
        from capguard.models.hf_vision import HFVisionEncoder

        tower, preprocess_cfg = cache.tower(vision_path, dev, dtype)
        encoder = HFVisionEncoder(tower, preprocess_cfg, config.vision.select_layer, config.vision.select_feature)
        visual, vision_files = tower, weight_files(vision_path)
    else:
        clip_model, preprocess_cfg = cache.clip_model(vision_path, dev, dtype)
        encoder = VisionEncoder(clip_model.visual, preprocess_cfg, config.vision.select_layer,
                                config.vision.select_feature)
        visual, vision_files = clip_model.visual, _clip_weights(vision_path)
    encoder = encoder.to(dev)
    llm_path = resolve(directory, config.llm.path, "llm")
    # vllm runs the LLM in its engine core: capguard keeps its input embeddings + tokenizer, not a second copy
    engine_name = resolve_engine(engine, llm_path)
    llm, tokenizer = (cache.input_embeddings if engine_name == "vllm" else cache.llm)(llm_path, dev, dtype)
    projector_path = resolve(directory, config.projector.weights, "projector weights")
    projector = load_projector(config, projector_path, encoder.width, llm.get_input_embeddings().embedding_dim,
                               encoder.tokens_per_frame)
    captioner = Captioner(encoder, projector.to(device=dev, dtype=dtype).eval(), llm, tokenizer, config.prompt)
    captioner.prefix_ids, captioner.suffix_ids = captioner.prefix_ids.to(dev), captioner.suffix_ids.to(dev)

    files = [*vision_files, projector_path, *weight_files(llm_path)]
    scorer = scorer_preprocess = None
    if with_scorer and config.scorer is not None:
        scorer_path = resolve(directory, config.scorer.path, "scorer")
        tok_dir = resolve(directory, config.scorer.tokenizer, "scorer tokenizer") if config.scorer.tokenizer else None
        scorer_model, scorer_cfg = cache.clip_model(scorer_path, dev, dtype)
        scorer = Scorer(scorer_model, load_tokenizer(scorer_path, tok_dir, scorer_model.context_length))
        if scorer_model.visual is not visual:
            scorer_preprocess = FramePreprocessor(scorer_cfg).to(dev)
        files += _clip_weights(scorer_path)
    digest = _combined(cache, files)
    llm_engine = cache.engine(engine_name, captioner, llm_path, dev, dtype)
    log.info("loaded checkpoint %s (%s projector, %s, %s, engine %s) fingerprint %s", directory.name,
             config.projector.type, dev, dtype, llm_engine.name, digest[:12])
    return CaptionStack(name or config.name or directory.name, directory, config, captioner, scorer,
                        scorer_preprocess, digest, dev, dtype, llm_engine)


def _clip_weights(path: Path) -> list[Path]:
    return [p for p in weight_files(path) if p.name.startswith("open_clip")]


def _combined(cache: ComponentCache, files: list[Path]) -> str:
    """Fingerprint of the stack: sha256 over the per-file sha256s, in component order."""
    import hashlib

    digest = hashlib.sha256()
    for path in files:
        digest.update(cache.file_hash(path).encode())
    return digest.hexdigest()
