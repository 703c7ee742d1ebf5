"""Metrics: one prometheus-client registry per relay, label values chosen by the relay, the library's exposition."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from relay.metrics import Metrics, api_label, kind_label, outcome_label
from relay.outcomes import Outcome, Verdict


def samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the text exposition, parsed by prometheus-client's own parser."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(m.render()) for s in family.samples}


def test_counters_gauges_and_histograms_render() -> None:
    m = Metrics()
    m.inc("relay_x_total", help="xs", kind="a")
    m.inc("relay_x_total", 2, kind="a")
    m.set("relay_y", 7, help="ys")
    m.set("relay_big", 1234567)
    m.observe("relay_z_seconds", 0.03, help="zs", status="ok")
    m.observe("relay_z_seconds", 3.0, status="ok")
    text = m.render()
    assert "# TYPE relay_x_total counter" in text and "# HELP relay_y ys" in text
    assert "relay_big 1.234567e+06" in text  # the library's float format: exact, unlike %g's 1.23457e+06
    got = samples(m)
    assert got[("relay_x_total", (("kind", "a"),))] == 3
    assert got[("relay_y", ())] == 7 and got[("relay_big", ())] == 1234567
    assert got[("relay_z_seconds_bucket", (("le", "0.05"), ("status", "ok")))] == 1
    assert got[("relay_z_seconds_bucket", (("le", "+Inf"), ("status", "ok")))] == 2
    assert got[("relay_z_seconds_count", (("status", "ok"),))] == 2
    assert m.value("relay_x_total", kind="a") == 3 and m.value("relay_y") == 7 and m.value("nope") == 0


def test_each_relay_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.inc("relay_x_total")
    b.inc("relay_x_total", 5)  # the same name in a second registry: no "Duplicated timeseries"
    assert a.value("relay_x_total") == 1 and b.value("relay_x_total") == 5


def test_value_sums_the_series_a_partial_label_set_matches() -> None:
    m = Metrics()
    m.inbound_event("default", "im.message.receive_v1", "published", 0.01)
    m.inbound_event("default", "card.action.trigger", "published", 0.01)
    m.inbound_event("default", "card.action.trigger", "duplicate", 0.01)
    assert m.value("relay_inbound_events_total", app="default") == 3
    assert m.value("relay_inbound_events_total", app="default", outcome="published") == 2


def test_collectors_run_at_each_render() -> None:
    m = Metrics()
    totals = {"n": 0}

    def collect(metrics: Metrics) -> None:
        totals["n"] += 5
        metrics.set_total("relay_kept_elsewhere_total", totals["n"], help="a running total", app="a")

    m.collect(collect)
    assert samples(m)[("relay_kept_elsewhere_total", (("app", "a"),))] == 5
    assert samples(m)[("relay_kept_elsewhere_total", (("app", "a"),))] == 10


def test_label_values_never_come_from_producer_input() -> None:
    assert kind_label("message.send") == "message.send" and kind_label("api.call") == "api.call"
    assert kind_label('message.send"} 1\nevil{') == "unknown" and kind_label(None) == "unknown"
    assert api_label("im.message.create") == "im.message.create"
    assert api_label("api:GET /open-apis/contact/v3/users/:") == "api.call"
    m = Metrics()
    m.intent_finished("x" * 10_000, "rejected", 0.001)
    m.inbound_event("default", "evil.type.v1", "published", 0.001)
    m.know_event_types(["my.custom.type_v1"])
    m.inbound_event("default", "my.custom.type_v1", "published", 0.001)
    got = samples(m)
    assert got[("relay_intents_total", (("kind", "unknown"), ("status", "rejected")))] == 1
    assert m.intents_finished == {("unknown", "rejected"): 1}  # the same count, readable without a scrape
    assert got[("relay_inbound_events_total", (("app", "default"), ("outcome", "published"), ("type", "other")))] == 1
    assert got[("relay_inbound_events_total",
                (("app", "default"), ("outcome", "published"), ("type", "my.custom.type_v1")))] == 1
    assert "evil" not in m.render() and "xxxx" not in m.render()


def test_outcome_labels() -> None:
    def outcome(verdict: Verdict, status: int | None, **kw: bool) -> Outcome:
        return Outcome(verdict=verdict, http_status=status, code=None, msg="", **kw)

    assert outcome_label(outcome(Verdict.OK, 200)) == "ok"
    assert outcome_label(outcome(Verdict.RETRY, 429, throttled=True)) == "throttled"
    assert outcome_label(outcome(Verdict.RETRY, None)) == "error"
    assert outcome_label(outcome(Verdict.RETRY, 503)) == "retry"
    assert outcome_label(outcome(Verdict.PERMANENT, 400)) == "permanent"


def test_consumer_lag_is_replaced_at_each_update() -> None:
    m = Metrics()
    m.consumer_lag({("t", 0): 5, ("t", 1): 0})
    assert samples(m)[("relay_outbound_consumer_lag", (("partition", "0"), ("topic", "t")))] == 5
    m.consumer_lag({("t", 1): 2})  # partition 0 revoked: its series goes
    got = samples(m)
    assert ("relay_outbound_consumer_lag", (("partition", "0"), ("topic", "t"))) not in got
    assert got[("relay_outbound_consumer_lag", (("partition", "1"), ("topic", "t")))] == 2
