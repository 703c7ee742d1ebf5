"""Process metrics in the Prometheus text format (``GET /metrics``): counters and summaries by label.

Small on purpose: a dict of counters keyed by (name, labels) and a few latency buckets. Names are
``relay_<what>_total`` for counters and ``relay_<what>_seconds`` for histograms.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable
from typing import Final

Labels = tuple[tuple[str, str], ...]

BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _labels(labels: dict[str, str]) -> Labels:
    return tuple(sorted(labels.items()))


def _fmt(labels: Labels, extra: tuple[tuple[str, str], ...] = ()) -> str:
    items = labels + extra
    if not items:
        return ""
    body = ",".join(f'{k}="{v}"' for k, v in items)
    return "{" + body + "}"


class Metrics:
    """Counters, gauges and histograms; one instance per process, passed to whoever counts."""

    def __init__(self) -> None:
        self._collectors: list[Callable[[Metrics], None]] = []
        self._counters: dict[str, dict[Labels, float]] = defaultdict(lambda: defaultdict(float))
        self._gauges: dict[str, dict[Labels, float]] = defaultdict(dict)
        self._hist: dict[str, dict[Labels, list[float]]] = defaultdict(dict)
        self._help: dict[str, str] = {}

    def inc(self, name: str, amount: float = 1.0, help: str = "", **labels: str) -> None:
        self._counters[name][_labels(labels)] += amount
        if help:
            self._help.setdefault(name, help)

    def collect(self, collector: Callable[[Metrics], None]) -> None:
        """Call ``collector(self)`` before every render: for values another part keeps (limiter, client)."""
        self._collectors.append(collector)

    def set_total(self, name: str, value: float, help: str = "", **labels: str) -> None:
        """Set a counter to a running total kept elsewhere (it only ever grows there)."""
        self._counters[name][_labels(labels)] = value
        if help:
            self._help.setdefault(name, help)

    def set(self, name: str, value: float, help: str = "", **labels: str) -> None:
        self._gauges[name][_labels(labels)] = value
        if help:
            self._help.setdefault(name, help)

    def observe(self, name: str, seconds: float, help: str = "", **labels: str) -> None:
        series = self._hist[name].setdefault(_labels(labels), [0.0] * (len(BUCKETS) + 2))
        series[bisect.bisect_left(BUCKETS, seconds)] += 1
        series[-1] += seconds
        if help:
            self._help.setdefault(name, help)

    def value(self, name: str, **labels: str) -> float:
        """A counter's or gauge's current value (0 when never touched); for tests and progress lines."""
        key = _labels(labels)
        if name in self._gauges and key in self._gauges[name]:
            return self._gauges[name][key]
        return self._counters.get(name, {}).get(key, 0.0)

    def render(self) -> str:
        for collector in self._collectors:
            collector(self)
        lines: list[str] = []
        for kind, table in (("counter", self._counters), ("gauge", self._gauges)):
            for name in sorted(table):
                if name in self._help:
                    lines.append(f"# HELP {name} {self._help[name]}")
                lines.append(f"# TYPE {name} {kind}")
                for labels, value in sorted(table[name].items()):
                    lines.append(f"{name}{_fmt(labels)} {value:g}")
        for name in sorted(self._hist):
            if name in self._help:
                lines.append(f"# HELP {name} {self._help[name]}")
            lines.append(f"# TYPE {name} histogram")
            for labels, series in sorted(self._hist[name].items()):
                cumulative = 0.0
                for bound, count in zip((*BUCKETS, float("inf")), series[:-1], strict=True):
                    cumulative += count
                    le = "+Inf" if bound == float("inf") else f"{bound:g}"
                    lines.append(f"{name}_bucket{_fmt(labels, (('le', le),))} {cumulative:g}")
                lines.append(f"{name}_count{_fmt(labels)} {cumulative:g}")
                lines.append(f"{name}_sum{_fmt(labels)} {series[-1]:g}")
        return "\n".join(lines) + "\n"
