"""What an evaluation captions: a make-videos JSONL manifest (with references and attributes) or a
directory of videos, loaded into a ``Dataset`` of ``VideoItem``s in a stable (natural) order."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts")


@dataclass
class VideoItem:
    id: str                          # manifest "id" (else the relative path): joins captions to videos
    path: Path                       # absolute file path: what the decoder opens
    rel: str                         # path relative to the data set root: what reports show (portable)
    reference: str | None = None     # reference caption in the report's language; None: not scored
    attributes: dict | None = None   # synth.BuildingAttrs fields (make-videos manifests): attribute accuracy


@dataclass
class Dataset:
    source: str                # what the caller passed (a manifest or a directory), recorded in the report
    kind: str                  # "manifest" | "dir"
    root: Path                 # the directory item paths are relative to
    items: list[VideoItem]
    lang: str | None = None    # language of the references ("ko" | "en"); None: no references


def natural_key(text: str) -> list:
    """Sort key that orders digit runs as numbers: "epoch-2" < "epoch-10" (plain sorting puts 10 first).

    Example: sorted(["epoch-10", "epoch-2", "epoch-1"], key=natural_key)
    -> ["epoch-1", "epoch-2", "epoch-10"].
    """
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text)]


def has_hangul(text: str) -> bool:
    return any("\uac00" <= ch <= "\ud7a3" for ch in text)


def load_dataset(source: str | os.PathLike, references: str = "auto", limit: int | None = None) -> Dataset:
    """A JSONL manifest (``capguard make-videos`` writes one) or a directory of videos -> a Dataset.

    Manifest lines: {"id", "path" (relative to the manifest's directory, or absolute), and optionally
    "caption_ko", "caption_en" (or a plain "caption"/"reference") and "attributes"}. A directory is
    searched recursively for VIDEO_EXTENSIONS files (natural order) and has no references.
    references: "auto" (Korean if the manifest has caption_ko, else English, else any plain caption),
    "ko", "en", or "none". limit: keep the first N videos.
    """
    if references not in ("auto", "ko", "en", "none"):
        raise ValueError(f"references={references!r}: use auto, ko, en or none")
    path = Path(source)
    if path.is_dir():
        files = sorted((p for p in path.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file()),
                       key=lambda p: natural_key(p.relative_to(path).as_posix()))
        items = [VideoItem(p.relative_to(path).as_posix(), p.resolve(), p.relative_to(path).as_posix())
                 for p in files]
        dataset = Dataset(str(source), "dir", path.resolve(), items)
    elif path.is_file():
        dataset = _load_manifest(path, references)
    else:
        raise FileNotFoundError(f"videos {source}: no such file or directory; pass a directory of videos "
                                "or a JSONL manifest (write one with `capguard make-videos`)")
    if limit is not None:
        dataset.items = dataset.items[:limit]
    if not dataset.items:
        raise ValueError(f"no videos in {source} (looked for {', '.join(VIDEO_EXTENSIONS)} files or manifest "
                         "lines); check the path")
    if dataset.lang is None:
        for item in dataset.items:
            item.reference = None
    return dataset


def _load_manifest(path: Path, references: str) -> Dataset:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON ({exc}); a manifest has one JSON object per line") \
                from None
        if not isinstance(row, dict) or not isinstance(row.get("path"), str):
            raise ValueError(f"{path}:{number}: each manifest line needs a \"path\" string")
        rows.append(row)
    fields_found = {k for row in rows for k in row}
    if references == "auto":
        candidates = ("caption_ko", "caption_en", "reference", "caption")
        field_name = next((f for f in candidates if f in fields_found), None)
    elif references == "none":
        field_name = None
    else:
        field_name = f"caption_{references}"
        if field_name not in fields_found:
            raise ValueError(f"{path} has no {field_name} field (it has {sorted(fields_found)}); "
                             "pick another --references language or none")
    root = path.parent.resolve()
    items = []
    for row in rows:
        file = Path(row["path"])
        file = file if file.is_absolute() else root / file
        reference = row.get(field_name) if field_name else None
        attributes = row.get("attributes") if isinstance(row.get("attributes"), dict) else None
        rel = os.path.relpath(file, root) if not Path(row["path"]).is_absolute() else row["path"]
        items.append(VideoItem(str(row.get("id") or Path(row["path"]).with_suffix("").as_posix()),
                               file, Path(rel).as_posix(), reference if isinstance(reference, str) else None,
                               attributes))
    lang = None
    if field_name in ("caption_ko", "caption_en"):
        lang = field_name[-2:]
    elif field_name is not None:   # a plain caption: Hangul in the references means Korean
        lang = "ko" if any(has_hangul(i.reference or "") for i in items) else "en"
    return Dataset(str(path), "manifest", root, items, lang)
