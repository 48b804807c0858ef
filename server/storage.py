"""The caption log: every served caption, appended to SQLite before its answer leaves the server.

A WAL database (server/db.py): a committed transaction survives the process being killed (kill -9),
though not a power cut. Writes come from the model thread once per batch; one connection shared under
a lock keeps them serialized.

The log restores the guard window on start (``recent``) and is what an operator audits later.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from capguard.server.db import connect, transaction

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS captions (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at   REAL NOT NULL,      -- unix seconds
    checkpoint   TEXT NOT NULL,      -- name under checkpoints_root
    fingerprint  TEXT NOT NULL,      -- sha256 of the weights that wrote the caption
    video_sha256 TEXT NOT NULL,
    caption      TEXT NOT NULL,
    num_tokens   INTEGER NOT NULL,
    siglip       REAL,               -- NULL without a scorer
    text_emb     BLOB,               -- float32 (E,), L2-normalized
    video_emb    BLOB,               -- float32 (E,)
    timings      TEXT NOT NULL,      -- JSON {stage: milliseconds}
    decoding     TEXT                -- JSON: the effective decoding options (models/decoding.py effective)
);
CREATE INDEX IF NOT EXISTS captions_by_checkpoint ON captions (checkpoint, id);
"""
# Columns added after the first release: (name, SQL type). A log written by an older server gets them on
# open (ALTER TABLE ... ADD COLUMN: old rows read NULL, i.e. "not recorded"), so no data is rewritten.
ADDED_COLUMNS = (("decoding", "TEXT"),)


@dataclass
class CaptionRecord:
    checkpoint: str                  # name under checkpoints_root
    fingerprint: str                 # the weights' sha256: restore only trusts rows of the same weights
    video_sha256: str                # the guard's identity of a video
    caption: str                     # exactly as answered
    num_tokens: int                  # generated tokens (EOS excluded)
    siglip: float | None             # scorer probability; None without a scorer
    text_emb: np.ndarray | None      # (E,) float32: the guard's grounding metric needs both embeddings
    video_emb: np.ndarray | None     # (E,) float32
    timings_ms: dict[str, float] = field(default_factory=dict)   # per stage, for audits of slow answers
    created_at: float = field(default_factory=time.time)          # unix seconds
    decoding: dict | None = None     # effective decoding options + max_new_tokens; None: not recorded


def _blob(vector: np.ndarray | None) -> bytes | None:
    return None if vector is None else np.asarray(vector, dtype=np.float32).tobytes()


def _vector(blob: bytes | None) -> np.ndarray | None:
    return None if blob is None else np.frombuffer(blob, dtype=np.float32).copy()


class CaptionLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn = connect(self.path, SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Add the columns an older log lacks (ADDED_COLUMNS); a no-op on a current one."""
        with self._lock:
            have = {row[1] for row in self._conn.execute("PRAGMA table_info(captions)")}
            for name, sql_type in ADDED_COLUMNS:
                if name not in have:
                    self._conn.execute(f"ALTER TABLE captions ADD COLUMN {name} {sql_type}")
                    log.info("caption log %s: added column %s", self.path, name)

    def append(self, records: list[CaptionRecord]) -> None:
        """Write `records` in one transaction; returns once they are committed."""
        rows = [(r.created_at, r.checkpoint, r.fingerprint, r.video_sha256, r.caption, r.num_tokens, r.siglip,
                 _blob(r.text_emb), _blob(r.video_emb), json.dumps(r.timings_ms),
                 None if r.decoding is None else json.dumps(r.decoding)) for r in records]
        with self._lock, transaction(self._conn):
            self._conn.executemany(
                "INSERT INTO captions (created_at, checkpoint, fingerprint, video_sha256, caption, num_tokens,"
                " siglip, text_emb, video_emb, timings, decoding) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def recent(self, checkpoint: str, limit: int, fingerprint: str | None = None) -> list[dict]:
        """The newest caption of each of the `limit` most recently captioned videos, oldest first.

        One row per video (its latest caption), which is what the guard window counts. With
        `fingerprint`, only captions written by those exact weights (a checkpoint dir whose weights
        were replaced starts a fresh window). Example: videos A, B, A captioned in that order ->
        [B's row, A's second row].
        """
        where, args = "checkpoint = ?", [checkpoint]
        if fingerprint is not None:
            where += " AND fingerprint = ?"
            args.append(fingerprint)
        with self._lock:
            rows = self._conn.execute(
                f"SELECT video_sha256, caption, siglip, text_emb, video_emb, fingerprint, created_at, decoding"
                f" FROM captions"
                f" WHERE id IN (SELECT MAX(id) FROM captions WHERE {where} GROUP BY video_sha256"
                f" ORDER BY MAX(id) DESC LIMIT ?) ORDER BY id", [*args, limit]).fetchall()
        return [{"video_sha256": sha, "caption": caption, "siglip": siglip, "text_emb": _vector(text),
                 "video_emb": _vector(video), "fingerprint": fp, "created_at": created,
                 "decoding": None if decoding is None else json.loads(decoding)}
                for sha, caption, siglip, text, video, fp, created, decoding in rows]

    def count(self, checkpoint: str | None = None) -> int:
        with self._lock:
            if checkpoint is None:
                return self._conn.execute("SELECT COUNT(*) FROM captions").fetchone()[0]
            return self._conn.execute("SELECT COUNT(*) FROM captions WHERE checkpoint = ?",
                                      (checkpoint,)).fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()
