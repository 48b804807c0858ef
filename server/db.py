"""SQLite as the server uses it: one WAL database per concern, written from several threads and processes.

    conn = connect(data_dir / "capguard.db", SCHEMA)
    with lock, transaction(conn):            # BEGIN ... COMMIT, or ROLLBACK on any exception
        conn.executemany("INSERT ...", rows)

The caption log (server/storage.py) and the evaluation job table (server/evaluations/store.py) both open
their file here. WAL + synchronous=NORMAL: a committed transaction survives the process being killed
(kill -9; the WAL is in the OS's hands), though not a power cut, and readers never block the writer.
The connection is in autocommit mode (``isolation_level=None``): a statement outside ``transaction`` is
its own transaction; callers share one connection between threads under their own lock.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def connect(path: str | os.PathLike, schema: str, timeout_s: float = 5.0) -> sqlite3.Connection:
    """Open (creating the directory and tables as needed) the WAL database at `path`.

    timeout_s: how long a write waits for another process's lock before ``database is locked``.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=timeout_s)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(schema)
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection, immediate: bool = False) -> Iterator[sqlite3.Connection]:
    """One transaction: committed when the block ends, rolled back (and the error raised) when it raises.

    immediate: take the write lock at BEGIN, so a read-then-write (claim the oldest queued job) is atomic
    against other processes writing the same file.
    """
    conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
