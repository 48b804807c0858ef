"""The ``capguard`` command line: serve, caption, evaluate, train, make-videos, init-checkpoint, import.

Each subcommand imports what it needs when it runs, so ``capguard caption`` never loads the web
stack and ``capguard --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")           # never reach for a hub (open_clip tokenizers try)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _die_with_parent() -> None:
    """In a process that multiprocessing spawned from capguard (a vLLM engine core: spawn re-imports the parent's
    main module, this one), ask Linux for SIGKILL when the parent dies: a server killed with kill -9 otherwise
    leaves its engine core running (found by bench/stress.py with CAPGUARD_ENGINE=vllm). Elsewhere a no-op."""
    import multiprocessing

    # spawn's child sets _inheriting while it re-imports the parent's main module (sys.argv is the parent's by then)
    if getattr(multiprocessing.current_process(), "_inheriting", False) and sys.platform.startswith("linux"):
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


_die_with_parent()

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CHECKPOINT = REPO_ROOT / "checkpoints" / "demo"
# capguard.models.projector's types and alias, spelled out so --help does not import torch
PROJECTORS = ["linear", "mlp2x_gelu", "c-abstractor", "resampler", "honeybee-c-abstractor"]


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("capguard",):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)


def _at_least(minimum: float, kind: type = int):
    """An argparse type: a number >= minimum, else a usage error (exit code 2) naming the value.

    ``--num-frames 0`` used to fall through an ``or`` to the checkpoint's default; now it is refused.
    Example: _at_least(1)("8") -> 8; _at_least(1)("0") -> ArgumentTypeError; _at_least(0)("0") -> 0.
    """
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value >= minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return value
    parse.__name__ = kind.__name__   # argparse names the type in its messages
    return parse


def _add_decoding_arguments(p: argparse.ArgumentParser) -> None:
    """The per-request decoding fields as flags (capguard.models.decoding; absent: the checkpoint's own)."""
    group = p.add_argument_group("decoding (default: each checkpoint's generation section)")
    group.add_argument("--do-sample", action=argparse.BooleanOptionalAction, default=None,
                       help="sample instead of greedy / beam search")
    group.add_argument("--temperature", type=float, help="> 0; needs --do-sample")
    group.add_argument("--top-p", type=float, help="(0, 1]; needs --do-sample")
    group.add_argument("--top-k", type=int, help=">= 0 (0: no limit); needs --do-sample")
    group.add_argument("--num-beams", type=int, help="beam search width; not with --do-sample")
    group.add_argument("--repetition-penalty", type=float, help="> 0 (1: none)")
    group.add_argument("--seed", type=int, help="needs --do-sample; caption: every video, evaluate: video i gets "
                                                "seed + i (reproducible runs)")
    group.add_argument("--stop-on-repetition", action=argparse.BooleanOptionalAction, default=None,
                       help="end a caption once its last tokens repeat (finish_reason repetition)")
    group.add_argument("--repetition-min-count", type=int, help="copies in a row that stop it, >= 2 (default 2); "
                                                                "needs --stop-on-repetition")
    group.add_argument("--repetition-min-pattern-size", type=int, help="tokens in the shortest repeating pattern "
                                                                       "(default 8); needs --stop-on-repetition")


def _decoding(args: argparse.Namespace):
    """The DecodingRequest the flags make; ValueError (-> usage error, exit 2) when it is not valid."""
    from capguard.models.decoding import DecodingRequest

    request = DecodingRequest(**{name: getattr(args, name) for name in DecodingRequest.names()})
    request.check()
    return request


def _use_engine(args: argparse.Namespace) -> None:
    """--engine wins over CAPGUARD_ENGINE; every load_stack of this process (evaluations too) reads it."""
    if getattr(args, "engine", None):
        os.environ["CAPGUARD_ENGINE"] = args.engine


def cmd_caption(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from capguard.models.decoding import effective
    from capguard.models.stack import load_stack
    from capguard.models.video import VideoError, VideoLimits, sample_frames

    _use_engine(args)
    stack = load_stack(args.checkpoint, device=args.device, with_scorer=not args.no_score)
    num_frames = stack.config.num_frames if args.num_frames is None else args.num_frames
    failures = 0
    for start in range(0, len(args.videos), args.batch_size):
        paths, frames, metas = [], [], []
        for path in args.videos[start:start + args.batch_size]:
            try:
                sampled = sample_frames(path, num_frames, VideoLimits(), max_side=stack.frame_side)
            except (VideoError, OSError) as exc:
                failures += 1
                print(json.dumps({"video": path, "error": {"code": getattr(exc, "code", "io_error"),
                                                           "message": str(exc)}}, ensure_ascii=False))
                continue
            paths.append(path)
            frames.append(sampled.frames)
            metas.append(sampled)
        if not frames:
            continue
        gens = [args.decoding.apply(stack.config.generation) for _ in frames]   # a drawn seed per video
        if args.max_new_tokens is not None:
            gens = [replace(gen, max_new_tokens=args.max_new_tokens) for gen in gens]
        outputs, stages = stack.caption(frames, generation=gens)
        for path, sampled, out, gen in zip(paths, metas, outputs, gens, strict=True):
            record = {
                "video": path, "caption": out.caption, "checkpoint": stack.name, "fingerprint": stack.fingerprint,
                "decoding": effective(gen), "finish_reason": out.finish_reason,
                "engine": stack.engine_name,
                "frames": {"count": len(sampled.indices), "indices": sampled.indices,
                           "timestamps_s": [round(t, 4) for t in sampled.timestamps_s], "backend": sampled.backend},
                "scores": {"siglip": out.score},
                "timings_ms": {k: round(v * 1000 / len(frames), 2) for k, v in stages.items()},
            }
            print(json.dumps(record, ensure_ascii=False), flush=True)
    return 1 if failures else 0


def cmd_init_checkpoint(args: argparse.Namespace) -> int:
    from capguard.models.components import PRESETS, init_checkpoint

    options = json.loads(args.options) if args.options else None
    path = init_checkpoint(args.directory, args.projector, sizes=PRESETS[args.preset], options=options,
                           seed=args.seed)
    print(json.dumps({"checkpoint": str(path), "projector": args.projector, "preset": args.preset}))
    return 0


def cmd_make_videos(args: argparse.Namespace) -> int:
    from capguard.models.synth import make_dataset

    manifests = make_dataset(args.out, n_train=args.train, n_val=args.val, seed=args.seed,
                             size=args.size, seconds=args.seconds, fps=args.fps)
    print(json.dumps({k: str(v) for k, v in manifests.items()}))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from capguard.models.train import TrainConfig, run

    cfg = TrainConfig(data=args.data, out=args.out, run=args.run or args.projector, lang=args.lang,
                      projector=args.projector, projector_options=json.loads(args.options or "{}"),
                      seed=args.seed, reuse_shared=not args.fresh, limit_train=args.limit_train,
                      limit_val=args.limit_val, threads=args.threads, select_layer=args.select_layer,
                      select_feature=args.select_feature)
    for name in ("siglip_epochs", "lm_epochs", "stage1_epochs", "stage2_epochs", "stage1_lr", "stage2_lr",
                 "batch_size", "patience", "weight_decay", "stop_on_collapse", "collapse_warmup"):
        value = getattr(args, name)
        if value is not None:
            setattr(cfg, name, value)
    history = run(cfg)
    for h in history:
        print(json.dumps({"epoch": h.epoch, "stage": h.stage, "val_loss": round(h.val_loss, 4),
                          "unique": f"{h.report['unique']}/{h.report['n']}",
                          "diversity": round(h.report["unique_ratio"], 3), "siglip": round(h.siglip_mean, 3),
                          "attribute_accuracy": h.attribute_accuracy, "tripped": h.tripped,
                          "top_mode": h.report["modes"][0]["representative"] if h.report["modes"] else None,
                          "checkpoint": h.checkpoint, **({"stopped": h.stopped} if h.stopped else {})},
                         ensure_ascii=False))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from capguard.models.evaluate import evaluate, load_dataset, watch

    if not args.watch and (args.once or args.max_checkpoints is not None):
        print("capguard evaluate: error: --once and --max-checkpoints only apply to --watch DIR", file=sys.stderr)
        return 2
    if args.captions:
        return _evaluate_captions(args)
    if args.scorer:
        print("capguard evaluate: error: --scorer only applies to --captions (checkpoints name their own scorer)",
              file=sys.stderr)
        return 2
    if not args.videos:
        print("capguard evaluate: error: --videos is required with --checkpoints or --watch", file=sys.stderr)
        return 2
    try:
        dataset = load_dataset(args.videos, args.references, args.limit)
    except ValueError as exc:   # a bad manifest or an empty directory: one line, no trace
        print(f"capguard evaluate: error: {exc}", file=sys.stderr)
        return 2
    options = {"num_frames": args.num_frames, "batch_size": args.batch_size, "device": args.device,
               "max_new_tokens": args.max_new_tokens, "decoding": args.decoding}
    if args.ray and args.watch:
        print("capguard evaluate: error: --ray sweeps --checkpoints; --watch runs on this machine", file=sys.stderr)
        return 2
    if args.actors < 1:
        print(f"capguard evaluate: error: --actors must be at least 1, got {args.actors}", file=sys.stderr)
        return 2
    _use_engine(args)
    try:
        if args.ray:
            if importlib.util.find_spec("ray") is None:
                print("capguard evaluate: error: --ray needs Ray: pip install 'capguard[ray]' (make install-ray)",
                      file=sys.stderr)
                return 2
            from capguard.models.ray_sweep import sweep

            report = sweep(args.checkpoints, dataset, args.out, address=args.ray, actors=args.actors, **options)
        elif args.watch:
            report = watch(args.watch, dataset, args.out, interval=args.interval, once=args.once,
                           max_checkpoints=args.max_checkpoints, **options)
        else:
            report = evaluate(args.checkpoints, dataset, args.out, **options)
    except KeyboardInterrupt:
        print(f"capguard evaluate: stopped; the report in {args.out} has every checkpoint finished so far",
              file=sys.stderr)
        return 130
    return _print_report(report, Path(args.out))


def _evaluate_captions(args: argparse.Namespace) -> int:
    """``capguard evaluate --captions A.jsonl B.jsonl``: a bad file is one line naming file and line, exit 2."""
    from capguard.models.captions_file import CaptionsFileError
    from capguard.models.evaluate.captions import evaluate_captions

    if args.videos and not Path(args.videos).is_dir():
        print(f"capguard evaluate: error: --videos {args.videos}: with --captions, a directory the rows' "
              "video_path values are relative to", file=sys.stderr)
        return 2
    try:
        report = evaluate_captions(args.captions, args.out, videos_root=args.videos, scorer=args.scorer or "auto",
                                   device=args.device, num_frames=args.num_frames or 8)
    except (CaptionsFileError, FileNotFoundError) as exc:
        print(f"capguard evaluate: error: {exc}", file=sys.stderr)
        return 2
    return _print_report(report, Path(args.out))


def _print_report(report: dict, out: Path) -> int:
    for row in report["checkpoints"]:
        print(json.dumps({"checkpoint": row["name"], "unique": f"{row['unique']}/{row['n']}",
                          "diversity": row["diversity"], "siglip": row["siglip_mean"],
                          "near_unique": row["near_unique"], "top_mode_share": row["top_mode_share"],
                          "grounding_r1": row["grounding_r1"], "status": row["status"], "tripped": row["tripped"],
                          "top_mode": row["top_mode"]}, ensure_ascii=False))
    for warning in report["warnings"]:
        print(f"warning: {warning['message']}", file=sys.stderr)
    print(json.dumps({"report": str(out / "report.json"), "html": str(out / "report.html"),
                      "captions": str(out / "captions.jsonl")}))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from capguard.models.config import MANIFEST_NAME
    from capguard.server.settings import Settings

    settings = Settings()
    if args.checkpoint:
        # a name under checkpoints_root ("runs/epoch-3") or a checkpoint directory anywhere
        path = Path(args.checkpoint).expanduser().resolve()
        root = settings.checkpoints_root.resolve()
        if not (path / MANIFEST_NAME).is_file():
            settings = Settings(default_checkpoint=args.checkpoint)
        elif path.is_relative_to(root) and len(path.relative_to(root).parts) <= 2:
            settings = Settings(default_checkpoint=path.relative_to(root).as_posix())
        else:   # outside the root: serve its parent directory
            settings = Settings(checkpoints_root=path.parent, default_checkpoint=path.name)
    checkpoint_dir = settings.checkpoints_root / settings.default_checkpoint
    if not (checkpoint_dir / MANIFEST_NAME).is_file():
        raise FileNotFoundError(f"no checkpoint at {checkpoint_dir} ({MANIFEST_NAME} missing); pass --checkpoint "
                                "DIR, or write one with `capguard init-checkpoint DIR` or `capguard train`")
    if args.host is not None:   # the bind decides whether admin routes may go without a token (server/deps.py)
        settings = settings.model_copy(update={"host": args.host})
    if args.engine is not None:   # --engine wins over CAPGUARD_ENGINE; chosen once, for every load of this server
        settings = settings.model_copy(update={"engine": args.engine})
    logging.getLogger("capguard.server.cli").info("LLM engine asked: %s", settings.engine)
    if args.ray:
        for flag, value in (("--replicas", args.replicas), ("--evaluation-actors", args.evaluation_actors)):
            if value < 1:   # before the Ray check: a bad flag is an error with or without Ray installed
                print(f"capguard serve: error: {flag} must be at least 1, got {value}", file=sys.stderr)
                return 2
        if importlib.util.find_spec("ray") is None:
            print("capguard serve: error: --ray needs Ray: pip install 'capguard[ray]' (make install-ray)",
                  file=sys.stderr)
            return 2
        from capguard.server.ray_serve import serve_forever

        return serve_forever(settings, args.ray, args.replicas, settings.host, args.port, args.evaluation_actors)
    threads = settings.resolved_torch_threads()
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
        logging.getLogger("capguard.server.cli").info("torch uses %d thread(s)", threads)   # also under python -m
    import uvicorn

    from capguard.server.app import create_app

    uvicorn.run(create_app(settings), host=settings.host, port=args.port, http=settings.http, loop=settings.loop,
                log_level="debug" if args.verbose else "info")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from capguard.models.components import copy_checkpoint

    relink = tuple(args.relink.split("=", 1)) if args.relink else None
    path = copy_checkpoint(args.source, args.dest, name=args.name, relink=relink)
    if args.guard:
        from capguard.models.config import CheckpointConfig

        config = CheckpointConfig.load(path)
        config.guard = json.loads(args.guard)
        config.save(path)
        CheckpointConfig.load(path)   # validates the thresholds' names
    print(json.dumps({"checkpoint": str(path)}))
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from capguard.models.importer import import_llava

    path = import_llava(args.source, args.out, prompt=args.prompt, instruction=args.instruction,
                        scorer=args.scorer, num_frames=args.num_frames, force=args.force)
    print(json.dumps({"checkpoint": str(path)}))
    return 0


def _engine_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=["auto", "hf", "vllm"],
                   help="LLM engine (default: CAPGUARD_ENGINE, else auto: vllm when installed and it supports "
                        "the LLM, else hf)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capguard", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the HTTP API (settings: CAPGUARD_* environment variables)")
    p.add_argument("--host", help="address to bind (default: CAPGUARD_HOST, else 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--checkpoint", help="checkpoint name under checkpoints_root, or a checkpoint directory "
                                        "(default: CAPGUARD_DEFAULT_CHECKPOINT, else checkpoints/demo)")
    p.add_argument("--ray", nargs="?", const="auto", metavar="auto|ADDRESS",
                   help="serve on Ray Serve: model replicas, one guard per checkpoint for all of them "
                        "(auto: the running cluster, else a local one)")
    p.add_argument("--replicas", type=int, default=2, help="--ray: model replicas (one GPU each when there are GPUs)")
    p.add_argument("--evaluation-actors", type=int, default=2,
                   help="--ray: actors in each evaluation job's pool (one loaded stack each)")
    _engine_argument(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("caption", help="caption videos; one JSON line per video")
    p.add_argument("videos", nargs="+")
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--num-frames", type=_at_least(1), default=None, help="default: the checkpoint's num_frames")
    p.add_argument("--max-new-tokens", type=_at_least(1), default=None)
    p.add_argument("--batch-size", type=_at_least(1), default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-score", action="store_true", help="skip the scorer")
    _add_decoding_arguments(p)
    _engine_argument(p)
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("init-checkpoint", help="write a tiny random-init stack (tests, wiring your own parts)")
    p.add_argument("directory")
    p.add_argument("--projector", default="mlp2x_gelu", choices=PROJECTORS)
    p.add_argument("--options", help='projector options as JSON, e.g. \'{"num_queries": 16}\'')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="tiny", choices=["tiny", "siglip-b16-qwen2-0.5b"],
                   help="model shapes (random weights): tiny, or SigLIP-B/16 at 224 px + a Qwen2-0.5B-shaped LLM")
    p.set_defaults(func=cmd_init_checkpoint)

    p = sub.add_parser("export", help="copy a checkpoint elsewhere, keeping its shared components reachable")
    p.add_argument("source")
    p.add_argument("dest")
    p.add_argument("--name", help="display name (default: the destination directory's name)")
    p.add_argument("--relink", metavar="OLD=NEW", help="point components under OLD at the same files under NEW")
    p.add_argument("--guard", help='guard thresholds for this checkpoint as JSON, e.g. \'{"near_dup_threshold": 0.97}\'')
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="convert a LLaVA-style transformers checkpoint into a capguard checkpoint")
    p.add_argument("source", help="LlavaForConditionalGeneration / LlavaOnevisionForConditionalGeneration dir")
    p.add_argument("--out", required=True, help="the capguard checkpoint directory to write")
    p.add_argument("--prompt", help="the whole prompt, with <image> or <video> where the frames go "
                                    "(default: the chat template rendered for --instruction)")
    p.add_argument("--instruction", help='the user turn for the chat template (default "Describe this video.")')
    p.add_argument("--scorer", help="an open_clip SigLIP/CLIP dir to score captions with")
    p.add_argument("--num-frames", type=_at_least(1), default=8)
    p.add_argument("--force", action="store_true", help="write into a non-empty --out")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("make-videos", help="render the synthetic building videos + JSONL manifests")
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=_at_least(0), default=865)
    p.add_argument("--val", type=_at_least(0), default=97)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=_at_least(1), default=128)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--fps", type=_at_least(1), default=8)
    p.set_defaults(func=cmd_make_videos)

    p = sub.add_parser("evaluate", help="caption a data set with several checkpoints; report.json/html per run")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoints", nargs="+", help="checkpoint directories, in the order of the report")
    which.add_argument("--watch", metavar="DIR", help="evaluate each new checkpoint a training run writes under DIR")
    which.add_argument("--captions", nargs="+", metavar="JSONL",
                       help="caption files from any pipeline, one per checkpoint or epoch (rows: video, caption, "
                            "optional siglip, reference, video_path)")
    p.add_argument("--videos", help="a JSONL manifest (capguard make-videos) or a directory of videos; with "
                                    "--captions: the directory video_path values are relative to")
    p.add_argument("--scorer", help="--captions: an open_clip SigLIP/CLIP directory that scores rows with a "
                                    "video_path (default: the shipped demo scorer; 'none' to skip)")
    p.add_argument("--references", default="auto", choices=["auto", "ko", "en", "none"],
                   help="reference captions from the manifest (auto: caption_ko, else caption_en)")
    p.add_argument("--out", required=True, help="output dir: report.json, report.html, captions.jsonl")
    p.add_argument("--num-frames", type=_at_least(1), default=None, help="default: each checkpoint's num_frames")
    p.add_argument("--max-new-tokens", type=_at_least(1), default=None, help="default: each checkpoint's own")
    p.add_argument("--batch-size", type=_at_least(1), default=16)
    p.add_argument("--limit", type=_at_least(1), help="evaluate the first N videos only")
    p.add_argument("--device", default="auto")
    p.add_argument("--interval", type=float, default=30.0, help="--watch: seconds between polls")
    p.add_argument("--max-checkpoints", type=_at_least(1), help="--watch: stop after N new checkpoints")
    p.add_argument("--once", action="store_true", help="--watch: evaluate what is complete now (two polls), then stop")
    p.add_argument("--ray", nargs="?", const="auto", metavar="auto|ADDRESS",
                   help="spread the work over a Ray cluster's actor pool (auto: the running one, else a local one); "
                        "a rerun resumes from out/sweep.jsonl")
    p.add_argument("--actors", type=int, default=2, help="--ray: workers in the pool, each holding one loaded stack")
    _add_decoding_arguments(p)
    _engine_argument(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("train", help="train encoder/scorer, LM and a captioner on a make-videos data set")
    p.add_argument("--data", required=True, help="dir with train.jsonl and val.jsonl")
    p.add_argument("--out", required=True, help="output root: shared/ components and <run>/epoch-N checkpoints")
    p.add_argument("--run", help="run name (default: the projector type)")
    p.add_argument("--projector", default="mlp2x_gelu", choices=PROJECTORS)
    p.add_argument("--options", help="projector options as JSON")
    p.add_argument("--lang", default="ko", choices=["ko", "en"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true", help="retrain the shared encoder/scorer and LM even if present")
    p.add_argument("--limit-train", type=_at_least(1))
    p.add_argument("--limit-val", type=_at_least(1))
    p.add_argument("--threads", type=_at_least(1))
    p.add_argument("--select-layer", type=int, default=-2)
    p.add_argument("--select-feature", default="patch", choices=["patch", "cls_patch"])
    for name, typ in (("siglip_epochs", int), ("lm_epochs", int), ("stage1_epochs", int), ("stage2_epochs", int),
                      ("stage1_lr", float), ("stage2_lr", float), ("batch_size", int), ("patience", int),
                      ("weight_decay", float)):
        p.add_argument("--" + name.replace("_", "-"), type=typ, dest=name)
    p.add_argument("--stop-on-collapse", type=_at_least(1), dest="stop_on_collapse", metavar="N",
                   help="stop after N epochs in a row that are collapsed (the guard's rules on the validation captions) "
                        "and not recovering (no collapse figure up 0.05 on the previous epoch); 4 is the callbacks' default")
    p.add_argument("--collapse-warmup", type=_at_least(0), dest="collapse_warmup", metavar="K",
                   help="--stop-on-collapse: do not count the first K epochs (default 0)")
    p.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "do_sample"):   # caption, evaluate: the decoding flags are checked before anything loads
        try:
            args.decoding = _decoding(args)
        except ValueError as exc:
            parser.error(f"{args.command}: {exc}")
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except Exception as exc:  # noqa: BLE001 - one clear line for the user, the trace with -v
        from capguard.models.config import CheckpointError
        from capguard.models.engines import EngineError

        if isinstance(exc, (CheckpointError, EngineError, FileNotFoundError)) and not args.verbose:
            print(f"capguard {args.command}: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
