"""Caption files from any pipeline: one JSONL file per checkpoint or epoch, read and checked line by line.

    files = [read_captions_file(p) for p in ("run/epoch-1.jsonl", "run/epoch-2.jsonl")]
    files[0].name, files[0].rows[0].caption, files[0].rows[0].siglip

A row is ``{"video": id, "caption": str}`` with optional ``"siglip": float`` (a score the user's own
pipeline computed), ``"reference": str`` and ``"video_path": str`` (relative to the file's directory, or to
``videos_root`` when given, or absolute). Other fields are kept out of the way, not rejected: pipelines
write their own bookkeeping (step, checkpoint hash) next to the caption. This is also the format
``capguard.callbacks`` writes (captions-epoch-N.jsonl), so a training run's files feed ``capguard evaluate
--captions`` as they are.

Everything wrong with a file is a ``CaptionsFileError`` that names the file and the line (1-based) and says
what to do: the CLI turns it into exit code 2, the server into 422 (413 for ``too_large``). Checked: UTF-8,
one JSON object per line, the two required fields, the type of every known field, one row per video id,
at least one row, and the size limits (a caption file of a 97-video validation set is ~20 KB; the limits
are there so an upload cannot hold the server's memory).
"""

from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

MAX_BYTES = 64 * 2**20      # a million captions of ~60 bytes; larger is a mistake or an attack
MAX_ROWS = 200_000          # rows per file: the report clusters them (O(n * modes)) in one process
MAX_CAPTION_CHARS = 4096    # one caption; a runaway generation is still a caption, a megabyte is not
FIELDS = ("video", "caption", "siglip", "reference", "video_path")


class CaptionsFileError(ValueError):
    """A caption file that cannot be used. ``code`` for APIs, ``line`` (1-based) when one line is at fault.

    Codes: not_utf8, not_jsonl, missing_field, wrong_type, duplicate_video, empty, too_large, not_found.
    """

    def __init__(self, source: str, message: str, *, line: int | None = None, code: str = "bad_captions"):
        self.source, self.line, self.code = source, line, code
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {message}")


@dataclass
class CaptionRow:
    video: str                     # the video's id: joins the epochs' captions of one video
    caption: str
    line: int                      # 1-based line in the file, for messages
    siglip: float | None = None    # the pipeline's own caption-video score; None: not given
    reference: str | None = None
    video_path: Path | None = None  # resolved; None when the row names no file


@dataclass
class CaptionsFile:
    name: str                      # the file's stem: the report's row name ("epoch-3")
    source: str                    # what messages and the report show (a path, or an upload's name)
    rows: list[CaptionRow]

    @property
    def has_scores(self) -> bool:
        """Every row carries a given SigLIP score (a partial column is used for the rows that have one)."""
        return all(r.siglip is not None for r in self.rows)

    @property
    def has_videos(self) -> bool:
        return all(r.video_path is not None for r in self.rows)


def read_captions_file(path: str | os.PathLike, *, videos_root: str | os.PathLike | None = None,
                       name: str | None = None, max_bytes: int = MAX_BYTES, max_rows: int = MAX_ROWS
                       ) -> CaptionsFile:
    """Read and check one caption file; video paths resolve against videos_root, else the file's directory."""
    path = Path(path)
    if not path.is_file():
        raise CaptionsFileError(str(path), "no such file; pass one JSONL file per checkpoint or epoch",
                                code="not_found")
    size = path.stat().st_size
    if size > max_bytes:
        raise CaptionsFileError(str(path), f"{size} bytes, over the {max_bytes}-byte limit; split it or "
                                           "evaluate a sample of the videos", code="too_large")
    root = Path(videos_root) if videos_root is not None else path.parent
    return parse_captions(path.read_bytes(), source=str(path), name=name or path.stem, videos_root=root,
                          max_bytes=max_bytes, max_rows=max_rows)


def parse_captions(data: bytes | str, *, source: str, name: str, videos_root: Path | None = None,
                   max_bytes: int = MAX_BYTES, max_rows: int = MAX_ROWS) -> CaptionsFile:
    """The rows of one caption file's content (an upload has no path): see the module docstring.

    Blank lines are skipped. video_path stays None when videos_root is None (an upload: its paths name
    nothing the server may open). Example: b'{"video": "v1", "caption": "낮의 풍경", "siglip": 0.3}\\n'
    -> CaptionsFile(name, source, [CaptionRow("v1", "낮의 풍경", line=1, siglip=0.3)]).
    """
    if len(data) > max_bytes:
        raise CaptionsFileError(source, f"{len(data)} bytes, over the {max_bytes}-byte limit",
                                code="too_large")
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = data[:exc.start].count(b"\n") + 1
            raise CaptionsFileError(source, f"not UTF-8 text ({exc.reason} at byte {exc.start}); save the "
                                            "file as UTF-8", line=line, code="not_utf8") from None
    rows: list[CaptionRow] = []
    seen: dict[str, int] = {}
    for number, text in enumerate(data.splitlines(), 1):
        if not text.strip():
            continue
        row = _row(text, source, number, videos_root)
        if row.video in seen:
            raise CaptionsFileError(source, f"video {row.video!r} again (first on line {seen[row.video]}); "
                                            "one caption per video and file: an epoch is one file",
                                    line=number, code="duplicate_video")
        seen[row.video] = number
        rows.append(row)
        if len(rows) > max_rows:
            raise CaptionsFileError(source, f"more than {max_rows} rows; evaluate a sample of the videos",
                                    line=number, code="too_large")
    if not rows:
        raise CaptionsFileError(source, 'no captions: expected one JSON object per line, e.g. '
                                        '{"video": "val-00001", "caption": "..."}', code="empty")
    return CaptionsFile(name, source, rows)


def _row(text: str, source: str, number: int, videos_root: Path | None) -> CaptionRow:
    def fail(message: str, code: str) -> CaptionsFileError:
        return CaptionsFileError(source, message, line=number, code=code)

    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise fail(f"not JSON ({exc.msg} at column {exc.colno}); a caption file has one JSON object per line "
                   "(JSONL), not a JSON array or CSV", "not_jsonl") from None
    if not isinstance(obj, dict):
        raise fail(f"a JSON {type(obj).__name__}, not an object; each line is "
                   '{"video": ..., "caption": ...}', "not_jsonl")
    for key in ("video", "caption"):
        if key not in obj:
            raise fail(f'no "{key}" field (the line has {sorted(obj)[:8]}); each line needs "video" and '
                       '"caption"', "missing_field")
    video = obj["video"]
    if isinstance(video, bool) or not isinstance(video, (str, int)) or (isinstance(video, str) and not video):
        raise fail(f'"video" must be a non-empty string (or an integer id), got {video!r}', "wrong_type")
    caption = obj["caption"]
    if not isinstance(caption, str):
        raise fail(f'"caption" must be a string, got {type(caption).__name__} {caption!r:.60}', "wrong_type")
    if len(caption) > MAX_CAPTION_CHARS:
        raise fail(f'"caption" is {len(caption)} characters, over {MAX_CAPTION_CHARS}', "too_large")
    siglip = obj.get("siglip")
    if siglip is not None:
        if isinstance(siglip, bool) or not isinstance(siglip, (int, float)) or not math.isfinite(siglip):
            raise fail(f'"siglip" must be a finite number (or null), got {siglip!r}', "wrong_type")
        siglip = float(siglip)
    for key in ("reference", "video_path"):
        if obj.get(key) is not None and not isinstance(obj[key], str):
            raise fail(f'"{key}" must be a string (or null), got {type(obj[key]).__name__}', "wrong_type")
    video_path = None
    if obj.get("video_path") and videos_root is not None:
        file = Path(obj["video_path"])
        video_path = file if file.is_absolute() else Path(videos_root) / file
    return CaptionRow(str(video), caption, number, siglip, obj.get("reference"), video_path)


def write_captions_file(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Write rows ({"video", "caption", optional "siglip", "reference", "video_path"}) as a caption file,
    atomically (a reader never sees half of it). None values are left out. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({k: row[k] for k in FIELDS if row.get(k) is not None}, ensure_ascii=False) + "\n"
             for row in rows]
    atomic_write_text(path, "".join(lines))
    return path


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file in the same directory and rename: readers see the old or the new file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


__all__ = ["FIELDS", "MAX_BYTES", "MAX_ROWS", "CaptionRow", "CaptionsFile", "CaptionsFileError",
           "atomic_write_text", "parse_captions", "read_captions_file", "write_captions_file"]
