"""Metrics: counters, gauges, histograms and collectors rendered in the Prometheus text format."""

from __future__ import annotations

from relay.metrics import Metrics


def test_counters_gauges_and_histograms_render() -> None:
    m = Metrics()
    m.inc("relay_x_total", help="xs", kind="a")
    m.inc("relay_x_total", 2, kind="a")
    m.set("relay_y", 7, help="ys")
    m.observe("relay_z_seconds", 0.03, help="zs", status="ok")
    m.observe("relay_z_seconds", 3.0, status="ok")
    text = m.render()
    assert '# TYPE relay_x_total counter\nrelay_x_total{kind="a"} 3' in text
    assert "# TYPE relay_y gauge\nrelay_y 7" in text
    assert 'relay_z_seconds_bucket{status="ok",le="0.05"} 1' in text
    assert 'relay_z_seconds_bucket{status="ok",le="+Inf"} 2' in text
    assert 'relay_z_seconds_count{status="ok"} 2' in text
    assert m.value("relay_x_total", kind="a") == 3 and m.value("relay_y") == 7 and m.value("nope") == 0


def test_collectors_run_at_each_render() -> None:
    m = Metrics()
    totals = {"n": 0}

    def collect(metrics: Metrics) -> None:
        totals["n"] += 5
        metrics.set_total("relay_kept_elsewhere_total", totals["n"], help="a running total")

    m.collect(collect)
    assert "relay_kept_elsewhere_total 5" in m.render()
    assert "relay_kept_elsewhere_total 10" in m.render()
