"""The batch-fed delay histogram is exposed exactly like prometheus-client's own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from cdc.telemetry.metrics import DELAY_BUCKETS, DelayHistogram


def _samples(registry: CollectorRegistry) -> list[str]:
    text = generate_latest(registry).decode()
    return [
        line for line in text.splitlines() if not line.startswith("#") and "_created" not in line
    ]


def test_delay_histogram_matches_a_native_histogram() -> None:
    values = [0.0, 0.0001, 0.0005, 0.001, 0.0015, 0.7, 3.0, 59.9, 60.0, 100.0]
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast = DelayHistogram("d", "delay", DELAY_BUCKETS, ours)
    native = Histogram("d", "delay", buckets=DELAY_BUCKETS, registry=theirs)
    fast.observe_many(values[:4])
    fast.observe_many(values[4:-1])
    fast.observe(values[-1])
    for value in values:
        native.observe(value)
    assert _samples(ours) == _samples(theirs)
    assert 'd_bucket{le="+Inf"} 10.0' in _samples(ours)
