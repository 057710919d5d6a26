"""Which frames keep their original bytes as evidence: every defect frame, and a sample of the
normal ones chosen by a hash of the frame id.

Why a hash and not a random draw: the worker decides (it attaches the bytes to the result) and
a replayed frame -- a worker killed before its commit -- must be decided the same way, so the
sample neither grows nor loses frames on a replay. The rule lives in the core so that anything
that needs to know whether a frame was sampled (the worker, tests, a recount) computes it once.
"""

from __future__ import annotations

import hashlib

_BUCKETS = 1_000_000


def sampled(frame_id: str, rate: float) -> bool:
    """Whether a normal frame falls in the kept sample at ``rate`` (0..1), deterministically."""
    if rate <= 0:
        return False
    if rate >= 1:
        return True
    h = int.from_bytes(hashlib.blake2b(frame_id.encode("utf-8"), digest_size=8).digest(), "big")
    return (h % _BUCKETS) < rate * _BUCKETS


def keep_reason(frame_id: str, verdict: str, rate: float) -> str | None:
    """'defect', 'sample' or None: why a frame's original bytes are kept, if they are."""
    if verdict == "defect":
        return "defect"
    return "sample" if sampled(frame_id, rate) else None
