"""Start a fresh Python interpreter that runs one function of capguard with the parent's sys.path.

    process = start_child("capguard.server.decode:worker_entry", [str(fd), decoder], pass_fds=[fd])

The decoder processes (server/decode.py) and the evaluation job processes (server/evaluations/) start
this way. Unlike multiprocessing's spawn, the child does not re-run the parent's ``__main__``, which
may import torch or not be a file at all (stdin, notebooks); it gets the parent's sys.path, made
absolute (a child may run in another working directory), so a decoder in tests/ or a script's folder
imports there too. The entry is called with the remaining arguments as a list of strings; its return
value is the exit status.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any

# the child's whole program: argv[1] the parent's sys.path (JSON), argv[2] "module:function", then its args
_BOOTSTRAP = ("import importlib, json, sys; sys.path[:] = json.loads(sys.argv[1]); "
              "module, _, name = sys.argv[2].partition(':'); "
              "sys.exit(getattr(importlib.import_module(module), name)(sys.argv[3:]))")


def parent_sys_path() -> list[str]:
    """This process's sys.path with relative entries made absolute. Example: ["", "src"] -> ["/cwd", "/cwd/src"]."""
    return [os.path.abspath(p) if p else os.getcwd() for p in sys.path]


def start_child(entry: str, args: list[str], **popen: Any) -> subprocess.Popen:
    """Run ``entry`` ("package.module:function", called with `args`) in a new interpreter.

    `popen`: subprocess.Popen keywords (cwd, env, pass_fds, stdout, start_new_session...); stdin is
    /dev/null unless given.
    """
    popen.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.Popen([sys.executable, "-c", _BOOTSTRAP, json.dumps(parent_sys_path()), entry, *args],
                            **popen)


def describe_exit(code: int) -> str:
    """A child's exit status in words. Example: -11 -> "killed by SIGSEGV"; 1 -> "exited with status 1"."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"
