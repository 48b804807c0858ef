"""A decoder for the server's worker processes that misbehaves on request (tests and bench/stress.py).

The server's ``decoder`` setting names it ("fault_decoder:decoder"); the decode workers import it
(pytest puts bench/ on sys.path, see pyproject.toml, and spawned workers inherit sys.path; bench/stress.py
gives its server bench/ in PYTHONPATH). Shared by the tests and the stress run. A file whose first bytes
are one of the magic words below makes the worker really die or hang; anything else is decoded
by capguard.models.video.sample_frames as usual.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np

from capguard.models.video import SampledFrames, sample_frames

SEGFAULT = b"CAPGUARD-TEST-SEGFAULT"   # the worker kills itself with SIGSEGV, as a crashing decoder would
ABORT = b"CAPGUARD-TEST-ABORT"         # os.abort(): SIGABRT, like decord's failed assertions
HANG = b"CAPGUARD-TEST-HANG"           # sleeps far past any decode time limit
OVERSIZE = b"CAPGUARD-TEST-OVERSIZE"   # answers frames far larger than max_side allows (a decoder gone rogue)


def decoder(path, num_frames, limits, max_side=None):
    with open(path, "rb") as f:
        head = f.read(32)
    if head.startswith(SEGFAULT):
        os.kill(os.getpid(), signal.SIGSEGV)
    if head.startswith(ABORT):
        os.abort()
    if head.startswith(HANG):
        time.sleep(3600)
    if head.startswith(OVERSIZE):
        side = 4 * (max_side or 64)
        return SampledFrames(np.zeros((num_frames, side, side, 3), np.uint8), list(range(num_frames)),
                             [0.0] * num_frames, None, "rogue")
    return sample_frames(path, num_frames, limits, max_side=max_side)
