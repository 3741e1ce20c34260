"""The overview's throughput chart as inline SVG, laid out here so the page needs no
JavaScript: one stacked bar per minute (delivered, deferred, failed)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mailstrom.readmodel.base import ThroughputBucket

WIDTH = 600
HEIGHT = 120
_SERIES = (("delivered", "delivered"), ("deferred", "deferred"), ("failed", "failed"))


@dataclass(frozen=True, slots=True, kw_only=True)
class Bar:
    """One rectangle: a series' share of one minute."""

    x: float
    y: float
    width: float
    height: float
    series: str
    title: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Chart:
    bars: tuple[Bar, ...]
    peak: int
    """Attempts in the busiest minute (the chart's full height)."""
    total: int
    width: int = WIDTH
    height: int = HEIGHT


def throughput_chart(buckets: Sequence[ThroughputBucket]) -> Chart:
    """Bars scaled so that the busiest minute fills the height."""
    peak = max((b.total for b in buckets), default=0)
    slot = WIDTH / max(len(buckets), 1)
    bars: list[Bar] = []
    for i, bucket in enumerate(buckets):
        base = float(HEIGHT)
        for attribute, series in _SERIES:
            n = getattr(bucket, attribute)
            if not n or not peak:
                continue
            height = HEIGHT * n / peak
            base -= height
            bars.append(
                Bar(
                    x=round(i * slot + 1, 2),
                    y=round(base, 2),
                    width=round(max(slot - 2, 1), 2),
                    height=round(height, 2),
                    series=series,
                    title=f"{bucket.start:%H:%M} UTC: {n} {series}",
                )
            )
    return Chart(bars=tuple(bars), peak=peak, total=sum(b.total for b in buckets))
