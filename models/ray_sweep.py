"""Evaluation sweeps on Ray Data: (checkpoint, video batch) work spread over an actor pool, one report.

    report = sweep(["runs/mlp/epoch-1", "runs/mlp/epoch-2"], "data/synth/val.jsonl", "out/eval", actors=4)

The report is the one ``capguard.models.evaluate.evaluate`` writes for the same arguments (same captions, same
figures; only run timings differ): the work is cut into the units the local run captions together
(``batch_size`` consecutive videos of one checkpoint), so every model call sees the same batch and left
padding, and the rows are built by the same ``checkpoint_row`` and ``Evaluator.write``.

- Workers: a ``ray.data.ActorPoolStrategy`` pool of ``SweepWorker`` actors; each holds one loaded stack
  (the checkpoint of its current unit; components shared between checkpoints stay cached, the rest are
  dropped when it moves on), decodes its videos itself and runs torch on one thread (one GPU per actor
  when the cluster has GPUs). ``preserve_order=True``: units come back in submission order.
- Resume: every finished unit's captions, scores and embeddings are appended to ``out_dir/sweep.jsonl``
  (flushed and fsynced as they arrive). A rerun with the same data set and options skips the units found
  there, so a sweep cut by a lost node, a killed driver or Ctrl-C redoes only what was in flight.
- Embeddings go through JSON as Python floats of float32 values, which round-trip exactly.
- Decoding: a ``DecodingRequest`` travels in the plan; each worker gives video i the local run's
  GenerationConfig for it (``Evaluator.generation``: the checkpoint's defaults with the run's fields, seed + i),
  so a sampled sweep with a seed gives the local run's captions too. The frame decoder ("module:function",
  the server's ``decoder`` setting) and its ``VideoLimits`` travel the same way.
- Evaluation jobs of a ``--ray`` server run this sweep (server/evaluations/child.py): ``progress_callback``
  feeds the job table, ``names`` the job's row names.

``import ray`` happens only inside ``sweep``; ``SweepWorker`` is a plain class (its unit test runs it
without a cluster).
"""

from __future__ import annotations

import json
import logging
import os
import pkgutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from capguard.models.config import MANIFEST_NAME, CheckpointConfig
from capguard.models.decoding import DecodingRequest
from capguard.models.degenerate import judge
from capguard.models.evaluate import Dataset, Evaluator, checkpoint_row, component_paths, load_dataset
from capguard.models.rules import GuardThresholds

log = logging.getLogger(__name__)

PARTIAL_NAME = "sweep.jsonl"   # finished units, one JSON line per (checkpoint, video); read back on resume


@dataclass(frozen=True)
class SweepPlan:
    """What a sweep captions and how; a resumed sweep must have the same plan (it is sweep.jsonl's header)."""

    checkpoints: tuple[str, ...]     # checkpoint directories, resolved, in report order
    videos: tuple[str, ...]          # absolute video paths, in data set order
    batch_size: int                  # videos per unit: the local run's model batch
    num_frames: int | None           # None: each checkpoint's own
    max_new_tokens: int | None       # None: each checkpoint's generation default
    device: str                      # what each worker loads on ("auto": its GPU when it has one)
    decoding: dict = field(default_factory=dict)   # DecodingRequest.given(): the run's decoding fields
    decoder: str = "capguard.models.video:sample_frames"   # "module:function" with sample_frames' signature
    limits: dict = field(default_factory=dict)     # capguard.models.video.VideoLimits fields ({}: defaults)
    engine: str | None = None        # auto | hf | vllm: the driver's CAPGUARD_ENGINE (a worker's env is not it)

    def units(self) -> list[dict]:
        """Example: 2 checkpoints, 5 videos, batch_size 2 -> 6 units, {"checkpoint": 0, "first": 0, "stop": 2}
        ... {"checkpoint": 1, "first": 4, "stop": 5}."""
        n = len(self.videos)
        return [{"checkpoint": c, "first": first, "stop": min(first + self.batch_size, n)}
                for c in range(len(self.checkpoints)) for first in range(0, n, self.batch_size)]


class SweepWorker:
    """Captions units of a plan; Ray Data runs one per actor of the pool (``map_batches``).

    ``__call__`` takes a batch of units {"checkpoint": (k,), "first": (k,), "stop": (k,)} and returns one row
    per video, {"checkpoint": (m,), "video": (m,), "row": (m,) JSON}: the caption, score and embeddings, or
    the decode error, plus what the report needs of the checkpoint (fingerprint, projector, epoch).
    """

    def __init__(self, plan: SweepPlan, threads: int = 1):
        import torch

        from capguard.models.stack import ComponentCache

        torch.set_num_threads(threads)   # one torch thread per actor: the pool, not OpenMP, uses the cores
        self.plan = plan
        self.decoding = DecodingRequest(**plan.decoding)       # read by ``generation``
        self.max_new_tokens = plan.max_new_tokens              # read by ``generation``
        self.decode = pkgutil.resolve_name(plan.decoder)       # (path, num_frames, limits, max_side=) -> Video
        self.cache = ComponentCache()
        self.stack, self.loaded = None, None

    def _load(self, index: int):
        from capguard.models.stack import load_stack

        if self.loaded != index:
            directory = self.plan.checkpoints[index]
            self.stack = None
            keep = component_paths(directory)
            for store in (self.cache.open_clip, self.cache.towers, self.cache.llms):   # keep what it shares
                for key in [k for k in store if Path(k[0]) not in keep]:
                    del store[key]
            self.stack = load_stack(directory, device=self.plan.device, cache=self.cache, with_scorer=True,
                                    engine=self.plan.engine)
            self.loaded = index
        return self.stack

    # video i's GenerationConfig exactly as the local run makes it (reads self.decoding, self.max_new_tokens)
    generation = Evaluator.generation

    def caption_unit(self, checkpoint: int, first: int, stop: int) -> list[dict]:
        """One unit -> one dict per video of it, in order (what ``Evaluator.add`` computes for that batch)."""
        from capguard.models.video import VideoError, VideoLimits

        stack = self._load(checkpoint)
        num_frames = self.plan.num_frames or stack.config.num_frames
        meta = {"fingerprint": stack.fingerprint, "projector_type": stack.projector_type, "name": stack.name,
                "epoch": stack.config.info.get("epoch"), "num_frames": num_frames, "scorer": stack.scorer is not None,
                "device": f"{stack.device} ({str(stack.dtype).removeprefix('torch.')})"}
        rows, frames, started = {}, {}, time.perf_counter()
        for i in range(first, stop):
            try:
                frames[i] = self.decode(Path(self.plan.videos[i]), num_frames, VideoLimits(**self.plan.limits),
                                        max_side=stack.frame_side).frames              # (T, H, W, 3) uint8
            except (VideoError, OSError) as exc:
                rows[i] = {"error": {"code": getattr(exc, "code", "io_error"), "message": str(exc)}}
        decode_s = time.perf_counter() - started
        if frames:
            gens = [self.generation(stack.config.generation, i) for i in frames]
            outputs, seconds = stack.caption(list(frames.values()), generation=gens)
            for i, out, gen in zip(frames, outputs, gens, strict=True):
                rows[i] = {"caption": out.caption, "siglip": out.score, "num_tokens": out.num_tokens,
                           "max_new_tokens": gen.max_new_tokens, "seed": gen.seed if gen.do_sample else None,
                           "finish_reason": out.finish_reason,
                           "text_emb": None if out.text_emb is None else out.text_emb.astype(np.float32).tolist(),
                           "video_emb": None if out.video_emb is None else out.video_emb.astype(np.float32).tolist()}
            rows[min(frames)]["timings_s"] = dict(seconds)   # the batch's stages, counted once per unit
        rows[first]["decode_s"] = decode_s
        return [{"checkpoint": checkpoint, "video": i, **meta, **rows[i]} for i in range(first, stop)]

    def __call__(self, batch: dict) -> dict:
        out = [row for c, f, s in zip(batch["checkpoint"], batch["first"], batch["stop"], strict=True)
               for row in self.caption_unit(int(c), int(f), int(s))]
        return {"checkpoint": [r["checkpoint"] for r in out], "video": [r["video"] for r in out],
                "row": [json.dumps(r, ensure_ascii=False) for r in out]}


def _read_partial(path: Path, plan: SweepPlan) -> dict[tuple[int, int], dict]:
    """(checkpoint, video) -> row of an earlier run of the same plan; {} when there is none or it differs."""
    if not path.is_file():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines()
    try:
        header = json.loads(lines[0]) if lines else None
    except json.JSONDecodeError:
        header = None
    if not header or header.get("plan") != json.loads(json.dumps(asdict(plan))):
        log.warning("%s is from another sweep (checkpoints, videos or options differ); starting over", path)
        return {}
    done, kept = {}, [lines[0]]
    for line in lines[1:]:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:   # the last line of a run killed while writing it
            log.warning("%s: a torn line dropped; its unit is captioned again", path)
            continue
        done[(row["checkpoint"], row["video"])] = row
        kept.append(line)
    if len(kept) < len(lines) or not path.read_bytes().endswith(b"\n"):   # appends must start on a fresh line
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)
    return done


def _pending(plan: SweepPlan, done: dict) -> list[dict]:
    """Units with any video missing from ``done`` (a unit is captioned whole, so its batch stays the same)."""
    return [u for u in plan.units() if any((u["checkpoint"], v) not in done for v in range(u["first"], u["stop"]))]


def connect(address: str | None) -> None:
    """Join the Ray cluster at ``address`` ("auto": the one RAY_ADDRESS or this machine runs, else a new local
    one), unless this process already is in one (tests, a server)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address in (None, "auto"):
        try:
            ray.init(address="auto", namespace="capguard")
            return
        except ConnectionError:
            log.info("no running Ray cluster found; starting a local one")
        ray.init(namespace="capguard", include_dashboard=False)
        return
    ray.init(address=address, namespace="capguard")


def sweep(checkpoint_dirs: Sequence[str | os.PathLike], videos: str | os.PathLike | Dataset,
          out_dir: str | os.PathLike, *, address: str | None = "auto", actors: int = 2, batch_size: int = 16,
          num_frames: int | None = None, max_new_tokens: int | None = None, device: str = "auto",
          thresholds: GuardThresholds | None = None, references: str = "auto", limit: int | None = None,
          decoding: DecodingRequest | None = None, decoder: str = "capguard.models.video:sample_frames",
          limits: dict | None = None, names: Sequence[str] | None = None,
          progress_callback: Callable[[int, int], None] | None = None, cpus_per_actor: float = 1.0,
          gpus_per_actor: float | None = None) -> dict:
    """``capguard.models.evaluate.evaluate`` on a Ray cluster; writes the same report.json, captions.jsonl and
    report.html in out_dir (plus sweep.jsonl, the finished units) and returns the report.

    actors: size of the worker pool; cpus_per_actor, gpus_per_actor: what each actor reserves (gpus None: 1 when
    the cluster has GPUs, else 0). decoding: as ``evaluate``'s. decoder, limits: how workers decode a video
    ("module:function" taking (path, num_frames, VideoLimits, max_side=); VideoLimits fields). names: each
    checkpoint's row name (default its own, "parent/name" on a clash). progress_callback(done, total): videos
    captioned so far over all checkpoints (those of an earlier run included), after each one arrives.
    """
    import ray

    if not checkpoint_dirs:
        raise ValueError("no checkpoints to evaluate; pass at least one checkpoint directory")
    if actors < 1 or batch_size < 1:
        raise ValueError(f"actors and batch_size must be at least 1, got {actors} and {batch_size}")
    if names is not None and len(names) != len(checkpoint_dirs):
        raise ValueError(f"{len(names)} names for {len(checkpoint_dirs)} checkpoints")
    decoding = decoding if decoding is not None else DecodingRequest()
    decoding.check()   # a bad field fails here, not in every actor
    pkgutil.resolve_name(decoder)   # and so does a decoder that does not import
    for directory in checkpoint_dirs:
        component_paths(directory)   # a typo fails here, before a cluster is asked for anything
    dataset = videos if isinstance(videos, Dataset) else load_dataset(videos, references, limit)
    plan = SweepPlan(tuple(str(Path(d).resolve()) for d in checkpoint_dirs),
                     tuple(str(Path(item.path).absolute()) for item in dataset.items), batch_size, num_frames,
                     max_new_tokens, device, decoding.given(), decoder, dict(limits or {}),
                     os.environ.get("CAPGUARD_ENGINE"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / PARTIAL_NAME
    done = _read_partial(partial, plan)
    todo = _pending(plan, done)
    log.info("sweep: %d checkpoints x %d videos = %d units, %d already done", len(plan.checkpoints),
             len(plan.videos), len(plan.units()), len(plan.units()) - len(todo))
    if not done:
        partial.write_text(json.dumps({"plan": asdict(plan)}, ensure_ascii=False) + "\n", encoding="utf-8")
    total = len(plan.checkpoints) * len(plan.videos)
    progress = progress_callback or (lambda done, total: None)
    progress(len(done), total)
    if todo:
        connect(address)
        if gpus_per_actor is None:
            gpus_per_actor = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        free = ray.available_resources()
        if free.get("CPU", 0) < cpus_per_actor or free.get("GPU", 0) < gpus_per_actor:   # e.g. Serve holds them
            log.warning("sweep: no room for an actor yet (each needs %g CPU, %g GPU; free now: %g CPU, %g GPU); "
                        "it waits until the cluster has it", cpus_per_actor, gpus_per_actor, free.get("CPU", 0),
                        free.get("GPU", 0))
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True   # units come back in the order they were sent
        if progress_callback is not None:
            context.enable_progress_bars = False   # the caller shows progress (a job's log is a file, not a tty)
        results = ray.data.from_items(todo).map_batches(
            SweepWorker, fn_constructor_kwargs={"plan": plan}, batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=min(actors, len(todo))),
            num_cpus=cpus_per_actor, num_gpus=gpus_per_actor)
        with partial.open("a", encoding="utf-8") as sink:
            for record in results.iter_rows():
                row = json.loads(record["row"])
                sink.write(record["row"] + "\n")
                sink.flush()
                os.fsync(sink.fileno())          # on disk before the next one: a lost node loses only its units
                done[(row["checkpoint"], row["video"])] = row
                progress(len(done), total)
    return write_report(plan, dataset, done, out, thresholds, paths=[str(d) for d in checkpoint_dirs], names=names)


def write_report(plan: SweepPlan, dataset: Dataset, done: dict, out_dir: Path,
                 thresholds: GuardThresholds | None = None, paths: Sequence[str] | None = None,
                 names: Sequence[str] | None = None) -> dict:
    """The Evaluator's report from the sweep's rows: each checkpoint's row, captions.jsonl, report.html.

    paths: the checkpoint paths as the caller gave them (what a local report shows); default the resolved ones.
    names: the rows' names as ``Evaluator.add`` takes them; default each checkpoint's own.
    """
    evaluator = Evaluator(dataset, out_dir, batch_size=plan.batch_size, num_frames=plan.num_frames, device=plan.device,
                          thresholds=thresholds, progress_bar=False, expected_checkpoints=len(plan.checkpoints),
                          max_new_tokens=plan.max_new_tokens, decoding=DecodingRequest(**plan.decoding))
    items = dataset.items
    for c, directory in enumerate(plan.checkpoints):
        rows = [done[(c, v)] for v in range(len(items))]
        for v, row in enumerate(rows):   # a video that failed to decode is left out from then on, as locally
            if "error" in row:
                evaluator.frames.failures.setdefault(v, row["error"])
        kept = [v for v, row in enumerate(rows) if v not in evaluator.frames.failures]
        if not kept:
            raise ValueError(f"no video of {dataset.source} could be decoded; see the warnings above")
        first = rows[0]
        fingerprints = {row["fingerprint"] for row in rows}
        if len(fingerprints) > 1:
            raise ValueError(f"{directory}: its weights changed during the sweep ({len(fingerprints)} fingerprints "
                             f"in {out_dir / PARTIAL_NAME}); delete that file to caption it again")
        evaluator.device_used = first["device"]
        name = evaluator._unique_name(names[c] if names else first["name"], Path(directory))   # as locally
        if not first["scorer"]:
            evaluator.extra_warnings.append({"code": "no_scorer", "message": (
                f"{name} has no scorer in its {MANIFEST_NAME}: SigLIP and grounding R@1 are not computed.")})
        config = CheckpointConfig.load(directory)
        judged_by = thresholds or replace(GuardThresholds(), **config.guard)
        limit = plan.max_new_tokens or config.generation.max_new_tokens   # rows of older sweeps lack their own
        stages = Counter()
        for row in rows:
            stages.update(row.get("timings_s", {}))
        chosen = [rows[v] for v in kept]
        grounded = all(r["text_emb"] is not None and r["video_emb"] is not None for r in chosen)
        info = {"path": paths[c] if paths else directory, "fingerprint": first["fingerprint"], "projector_type": first["projector_type"],
                "epoch": first["epoch"], "num_frames": first["num_frames"],
                "seconds": sum(stages.values()) + sum(r.get("decode_s", 0.0) for r in rows),
                "timings_s": dict(stages)}
        report_row = checkpoint_row(
            name, [r["caption"] for r in chosen], scores=[r["siglip"] for r in chosen],
            text_emb=np.array([r["text_emb"] for r in chosen], dtype=np.float32) if grounded else None,   # (n, E)
            video_emb=np.array([r["video_emb"] for r in chosen], dtype=np.float32) if grounded else None,  # (n, E)
            references=[items[v].reference for v in kept] if dataset.lang else None,
            attributes=[items[v].attributes for v in kept] if any(items[v].attributes for v in kept) else None,
            lang=dataset.lang, ids=[items[v].id for v in kept], thresholds=judged_by, info=info,
            degenerate=[getattr(judge(r["caption"], r["num_tokens"], r.get("max_new_tokens", limit),
                                      r.get("finish_reason")), "kind", None) for r in chosen],
            finish_reasons=[r.get("finish_reason") for r in chosen])
        evaluator.rows.append(report_row)
        evaluator.records += [{"checkpoint": name, "id": items[v].id, "path": items[v].rel,
                               "caption": rows[v]["caption"], "reference": items[v].reference,
                               "siglip": rows[v]["siglip"], "seed": rows[v].get("seed"),
                               "finish_reason": rows[v].get("finish_reason")} for v in kept]
    return evaluator.write()


__all__ = ["PARTIAL_NAME", "SweepPlan", "SweepWorker", "connect", "sweep", "write_report"]
