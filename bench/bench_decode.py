"""Frame sampling: decord vs PyAV (seek) vs a full sequential decode, and what backend="auto" picks.

    .venv/bin/python bench/bench_decode.py                      # 9 videos (h264/vp9/av1 x short/long/1080p)
    .venv/bin/python bench/bench_decode.py --4k --repeats 5      # adds 3840x2160 clips
    .venv/bin/python bench/bench_decode.py --quick               # small videos only (CI smoke test)

Videos come from bench/videomaker.py (each frame shows its own index, so every backend's frames are
checked: ``read_index(frame) == index``), encoded once with each encoder's default keyframe interval
and cached in ``--video-dir``. Per video, 8 frames at ``--max-side`` (128: the demo stack's frame_side)
with:

- decord: ``sample_frames(backend="decord")`` (no AV1 support: "n/a")
- pyav: ``sample_frames(backend="pyav")``: one demux pass, then seek to the keyframe before each
  sampled frame and decode forward to it
- sequential: the naive way, PyAV decoding every frame from the start and converting the sampled
  ones (written here, ~15 lines: the baseline the other two must beat)
- auto: ``sample_frames(backend="auto")``, what the server runs; its chosen backend is printed

Backends run round-robin, ``--repeats`` times, in this one process; the table shows medians, the
ratios, and whether auto chose the faster of decord and PyAV where both return exact frames.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import av  # before decord (models/video/ package docstring)
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))   # this tree's capguard; videomaker is this folder's

from videomaker import av1_encoder, make_video, read_index  # noqa: E402

from capguard.models.video import sample_frames, sample_indices, scaled_size  # noqa: E402

BACKENDS = ("decord", "pyav", "sequential", "auto")


@dataclass(frozen=True)
class Spec:
    """One benchmark video."""
    name: str          # table label, e.g. "h264 long"
    codec: str         # videomaker codec name
    container: str     # file suffix
    frames: int        # frames at 24 fps
    size: tuple[int, int]   # (width, height)


def specs(quick: bool, with_4k: bool) -> list[Spec]:
    codecs = [("h264", "libx264", "mp4"), ("vp9", "libvpx-vp9", "webm")]
    if av1_encoder():
        codecs.append(("av1", "av1", "mkv"))
    kinds = [("short", 48, (320, 240))]
    if not quick:
        kinds += [("long 60s", 60 * 24, (320, 240)), ("1080p", 48, (1920, 1080))]
        if with_4k:
            kinds.append(("4K", 24, (3840, 2160)))
    return [Spec(f"{label} {kind}", codec, suffix, n, size)
            for label, codec, suffix in codecs for kind, n, size in kinds]


def make(spec: Spec, directory: Path) -> Path:
    """The spec's video, encoded once and kept in `directory`."""
    path = directory / f"{spec.name.replace(' ', '_')}_{spec.size[0]}x{spec.size[1]}_{spec.frames}.{spec.container}"
    if not path.exists():
        started = time.perf_counter()
        tmp = path.with_name("tmp-" + path.name)
        make_video(tmp, codec=spec.codec, num_frames=spec.frames, size=spec.size)
        tmp.rename(path)
        print(f"  encoded {path.name} in {time.perf_counter() - started:.1f} s", flush=True)
    return path


def keyframes(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(p.is_keyframe for p in container.demux(container.streams.video[0]) if p.size)


def sequential(path: Path, num_frames: int, max_side: int | None) -> tuple[np.ndarray, list[int]]:
    """Decode every frame in order with PyAV; convert the sampled ones. The naive baseline."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_type = "AUTO"
        total = sum(1 for p in container.demux(stream) if p.size)
    indices = sample_indices(total, num_frames)
    wanted, images = set(indices), {}
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_type = "AUTO"
        size = scaled_size(stream.codec_context.width, stream.codec_context.height, max_side)
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                kwargs = {"width": size[0], "height": size[1]} if size else {}
                images[i] = frame.to_ndarray(format="rgb24", **kwargs)
    return np.stack([images[i] for i in indices]), indices


def run(backend: str, path: Path, num_frames: int, max_side: int | None) -> tuple[float, bool, str]:
    """(seconds, frames exact, backend used); raises what the backend raises."""
    started = time.perf_counter()
    if backend == "sequential":
        frames, indices = sequential(path, num_frames, max_side)
        used = "sequential"
    else:
        sample = sample_frames(path, num_frames, backend=backend, max_side=max_side)
        frames, indices, used = sample.frames, sample.indices, sample.backend
    seconds = time.perf_counter() - started
    return seconds, [read_index(f) for f in frames] == list(indices), used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video-dir", type=Path, default=Path("/tmp/capguard-bench-videos"),
                        help="where the encoded videos are kept between runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-frames", type=int, default=8)
    parser.add_argument("--max-side", type=int, default=128, help="0: full size")
    parser.add_argument("--4k", dest="with_4k", action="store_true", help="add 3840x2160 clips (slow to encode)")
    parser.add_argument("--quick", action="store_true", help="short clips only")
    args = parser.parse_args()
    max_side = args.max_side or None
    args.video_dir.mkdir(parents=True, exist_ok=True)
    print(f"{args.num_frames} frames per video at max_side={max_side}; median of {args.repeats}; videos in "
          f"{args.video_dir}", flush=True)
    videos = [(spec, make(spec, args.video_dir)) for spec in specs(args.quick, args.with_4k)]

    header = (f"{'video':<16} {'size':>9} {'frames':>6} {'keys':>5} {'decord ms':>10} {'pyav ms':>9} "
              f"{'seq ms':>9} {'auto ms':>9} {'auto used':>9} {'seq/pyav':>8} {'pyav/decord':>11} "
              f"{'auto/best':>9}  exact (d p s a)")
    rows, verdicts = [header], []
    for spec, path in videos:
        times: dict[str, list[float]] = {b: [] for b in BACKENDS}
        exact: dict[str, bool] = {}
        used = "?"
        for _ in range(args.repeats):
            for backend in BACKENDS:
                if backend in exact and times[backend] == []:
                    continue   # it failed before
                try:
                    seconds, ok, chosen = run(backend, path, args.num_frames, max_side)
                except Exception:  # noqa: BLE001 - decord cannot open AV1: reported as n/a
                    exact.setdefault(backend, False)
                    continue
                times[backend].append(seconds)
                exact[backend] = exact.get(backend, True) and ok
                used = chosen if backend == "auto" else used
        ms = {b: 1000 * statistics.median(t) if t else None for b, t in times.items()}
        # what auto chooses between: decord and PyAV, where they return exact frames
        options = {b: ms[b] for b in ("decord", "pyav") if ms[b] is not None and exact.get(b)}
        best = min(options, key=options.get) if options else None
        fmt = lambda v: "n/a" if v is None else f"{v:.1f}"   # noqa: E731
        div = lambda a, b: "-" if a is None or b is None else f"{a / b:.2f}x"   # noqa: E731
        rows.append(f"{spec.name:<16} {spec.size[0]:>4}x{spec.size[1]:<4} {spec.frames:>6} {keyframes(path):>5} "
                    f"{fmt(ms['decord']):>10} {fmt(ms['pyav']):>9} {fmt(ms['sequential']):>9} "
                    f"{fmt(ms['auto']):>9} {used:>9} {div(ms['sequential'], ms['pyav']):>8} "
                    f"{div(ms['pyav'], ms['decord']):>11} {div(ms['auto'], options.get(best)):>9}  "
                    + " ".join("y" if exact.get(b) else ("-" if times[b] == [] else "N") for b in BACKENDS))
        if best is not None and ms["auto"] is not None:
            verdicts.append((spec.name, best, used, options.get(used), options[best], ms["auto"]))
    print("\n".join(rows))
    print("\nexact: y = every frame is the one asked for, N = wrong frames, - = could not decode")
    print("auto/best: auto against the faster of decord and PyAV where exact (auto adds a probe and, before")
    print("decord, one demux pass that keeps truncated files away from it)")
    wrong = [v for v in verdicts if v[3] is None or v[3] > 1.10 * v[4]]
    print(f"auto chose the faster exact backend (within 10 %) on {len(verdicts) - len(wrong)}/{len(verdicts)} videos"
          + "".join(f"\n  {name}: auto used {used}, {best} was faster ({chosen or float('nan'):.1f} vs {fastest:.1f} ms)"
                    for name, best, used, chosen, fastest, _ in wrong))
    overhead = [auto / chosen for _, _, used, chosen, _, auto in verdicts if chosen]
    if overhead:
        print(f"auto's own cost over its chosen backend forced: median {statistics.median(overhead):.2f}x")

if __name__ == "__main__":
    main()
