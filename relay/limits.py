"""Token buckets sized for Feishu's counting windows. (Being written: see the limits work item.)"""

from __future__ import annotations

import msgspec


class Window(msgspec.Struct, frozen=True):
    """Feishu admits at most ``limit`` calls in any ``seconds``-long window."""

    limit: int
    seconds: float
