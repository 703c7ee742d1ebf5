"""One relay's metrics: a prometheus-client ``CollectorRegistry`` of its own, served at ``GET /metrics``.

Each :class:`Metrics` has its own registry (never prometheus-client's global one), so a test can run several
relays in one process and read each one's numbers. The exposition is the library's own (``/metrics`` answers
the text format, or OpenMetrics when the scraper asks for it), so value formatting, escaping and ``# TYPE``
lines are what every Prometheus expects.

**Label values never come from producer input.** An intent's ``kind`` is a label only when it is a kind the
relay knows (else ``unknown``); an API is a built-in API's name or ``api.call`` (an ``api.call``'s own path is
the caller's); an inbound event type is one of :data:`EVENT_TYPES` or one configured in ``inbound.routes`` /
``inbound.callback_types`` (else ``other``); apps are the configured ones; statuses, outcomes and reasons are
the relay's own words. So no producer can grow the number of series.

Two ways to count:

- the typed helpers (:meth:`Metrics.intent_finished`, :meth:`Metrics.feishu_call`, ...) for the series whose
  labels need the rule above: they choose the label values;
- :meth:`Metrics.inc` / :meth:`Metrics.set` / :meth:`Metrics.observe` by name with the relay's own label
  values. A family is created at its first use with that use's label names (one name, one set of labels);
  ``help`` is read at that first use.

Values another part keeps as running totals (the limiter's, the client's) are read at each scrape:
:meth:`Metrics.collect` registers a callback that calls :meth:`Metrics.set_total` or :meth:`Metrics.set`.
Names: ``relay_<what>_total`` for counters, ``relay_<what>_seconds`` for histograms, plain for gauges.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Final, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from relay.calls import API_WINDOWS
from relay.intents import Intent
from relay.outcomes import Outcome, Verdict

# seconds; from a fast Feishu answer (~5 ms) to a long limiter wait (a minute window)
BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

KINDS: Final[frozenset[str]] = frozenset(t.__struct_config__.tag for t in get_args(Intent))
UNKNOWN_KIND: Final = "unknown"
API_CALL: Final = "api.call"
OTHER_EVENT: Final = "other"

# the event types relay.events is checked against (its EventIds table); v1 types by their ``event.type``
EVENT_TYPES: Final = frozenset({
    "im.message.receive_v1", "im.message.recalled_v1", "im.message.message_read_v1",
    "im.message.reaction.created_v1", "im.message.reaction.deleted_v1", "im.chat.updated_v1",
    "im.chat.disbanded_v1", "im.chat.member.user.added_v1", "im.chat.member.user.deleted_v1",
    "im.chat.member.bot.added_v1", "im.chat.member.bot.deleted_v1",
    "im.chat.access_event.bot_p2p_chat_entered_v1", "card.action.trigger", "url.preview.get",
    "message", "add_bot", "p2p_chat_create",
})


def kind_label(kind: str | None) -> str:
    """The ``kind`` label: a kind the relay knows, else ``unknown`` (a producer's typo never becomes a label)."""
    return kind if kind in KINDS else UNKNOWN_KIND


def api_label(api: str) -> str:
    """The ``api`` label: a built-in API's name; every other ``api.call`` is ``api.call`` (its path is the
    producer's, so it is never a label)."""
    return api if api in API_WINDOWS else API_CALL


def outcome_label(outcome: Outcome) -> str:
    """The ``outcome`` of one Feishu call: ``throttled``, ``error`` (no HTTP answer), or the verdict's value
    (``ok``, ``partial``, ``retry``, ``refresh``, ``permanent``)."""
    if outcome.throttled:
        return "throttled"
    if outcome.http_status is None and outcome.verdict is Verdict.RETRY:
        return "error"
    return outcome.verdict.value


class _Snapshots(Collector):
    """The series whose values are read at each scrape (running totals kept elsewhere, consumer lag)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.totals: dict[str, tuple[str, dict[tuple[tuple[str, str], ...], float]]] = {}
        self.lag: dict[tuple[str, int], int] = {}

    def describe(self) -> Iterable[Metric]:
        return ()  # names are not known before the first scrape; the registry checks the declared ones

    def collect(self) -> Iterable[Metric]:
        with self.lock:
            totals = {name: (help, dict(series)) for name, (help, series) in self.totals.items()}
            lag = dict(self.lag)
        for name, (help, series) in sorted(totals.items()):
            names = sorted({k for labels in series for k, _ in labels})
            family = CounterMetricFamily(name, help or name, labels=names)
            for labels, value in sorted(series.items()):
                family.add_metric([dict(labels)[k] for k in names], value)
            yield family
        lags = GaugeMetricFamily("relay_outbound_consumer_lag",
                                   "records of an owned intents partition not yet finished (high watermark minus "
                                   "the commit point)", labels=["topic", "partition"])
        for (topic, partition), value in sorted(lag.items()):
            lags.add_metric([topic, str(partition)], value)
        yield lags


class Metrics:
    """Counters, gauges and histograms of one relay; passed to whoever counts."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._families: dict[str, MetricWrapperBase] = {}
        # (name, *label values) -> the labelled child: prometheus-client's labels() takes a lock and builds
        # tuples per call; the label values are bounded (module doc), so this is too
        self._children: dict[tuple[str, ...], MetricWrapperBase] = {}
        self._callbacks: list[Callable[[Metrics], None]] = []
        self._snapshots = _Snapshots()
        self.registry.register(self._snapshots)
        self._event_types: frozenset[str] = EVENT_TYPES
        # (kind label, status) -> intents finished: relay_intents_total without a scrape, for a caller that asks
        # often (a benchmark's or a test's progress poll: a whole scrape costs milliseconds)
        self.intents_finished: collections.Counter[tuple[str, str]] = collections.Counter()

    # by name ------------------------------------------------------------------------------------------

    def _family(self, make: Callable[[str, str, list[str]], MetricWrapperBase], name: str, help: str,
                labels: Mapping[str, str]) -> MetricWrapperBase:
        key = (name, *labels.values())  # the call sites' keyword order; another order is only another entry
        child = self._children.get(key)
        if child is None:
            family = self._families.get(name)
            if family is None:
                family = self._families[name] = make(name, help or name, sorted(labels))
            child = self._children[key] = family.labels(**labels) if labels else family
        return child

    def _counter(self, name: str, help: str, labels: list[str]) -> Counter:
        return Counter(name, help, labels, registry=self.registry)

    def _gauge(self, name: str, help: str, labels: list[str]) -> Gauge:
        return Gauge(name, help, labels, registry=self.registry)

    def _histogram(self, name: str, help: str, labels: list[str]) -> Histogram:
        return Histogram(name, help, labels, registry=self.registry, buckets=BUCKETS)

    def inc(self, name: str, amount: float = 1.0, help: str = "", **labels: str) -> None:
        family = self._family(self._counter, name, help, labels)
        assert isinstance(family, Counter), f"{name} is not a counter"
        family.inc(amount)

    def set(self, name: str, value: float, help: str = "", **labels: str) -> None:
        family = self._family(self._gauge, name, help, labels)
        assert isinstance(family, Gauge), f"{name} is not a gauge"
        family.set(value)

    def observe(self, name: str, seconds: float, help: str = "", **labels: str) -> None:
        family = self._family(self._histogram, name, help, labels)
        assert isinstance(family, Histogram), f"{name} is not a histogram"
        family.observe(seconds)

    def collect(self, callback: Callable[[Metrics], None]) -> None:
        """Call ``callback(self)`` before every scrape: for values another part keeps (limiter, client)."""
        self._callbacks.append(callback)

    def set_total(self, name: str, value: float, help: str = "", **labels: str) -> None:
        """Set a counter to a running total kept elsewhere (it only ever grows there)."""
        with self._snapshots.lock:
            _, series = self._snapshots.totals.setdefault(name, (help, {}))
            series[tuple(sorted(labels.items()))] = value

    # typed helpers: they choose the label values (module doc) ---------------------------------------------

    def intent_finished(self, kind: str | None, status: str, seconds: float) -> None:
        label = kind_label(kind)
        self.inc("relay_intents_total", help="intents finished, by kind and status", kind=label, status=status)
        self.intents_finished[label, status] += 1
        self.observe("relay_intent_seconds", seconds, help="read to result written", status=status)

    def feishu_call(self, app: str, api: str, outcome: Outcome, seconds: float) -> None:
        """One Feishu API request and its answer (a call held for want of a tenant token is no request)."""
        api = api_label(api)
        self.inc("relay_feishu_calls_total", help="Feishu API requests, by app, API and outcome",
                 app=app, api=api, outcome=outcome_label(outcome))
        self.observe("relay_feishu_call_seconds", seconds, help="Feishu API request to answer, by API", api=api)

    def limiter_waited(self, api: str, seconds: float) -> None:
        self.observe("relay_limiter_wait_seconds", seconds,
                     help="time a call waited for its buckets (per target and app-wide), by API", api=api_label(api))

    def token_refresh(self, app: str, ok: bool) -> None:
        self.inc("relay_feishu_token_refreshes_total", help="tenant_access_token requests, by app and outcome",
                 app=app, outcome="ok" if ok else "failed")

    def know_event_types(self, types: Iterable[str]) -> None:
        """Event types the config names (``inbound.routes``, ``inbound.callback_types``): labels too."""
        self._event_types = self._event_types | frozenset(types)

    def event_type(self, event_type: str) -> str:
        return event_type if event_type in self._event_types else OTHER_EVENT

    def inbound_event(self, app: str, event_type: str, outcome: str, seconds: float) -> None:
        self.inc("relay_inbound_events_total", help="events answered, by app, type and outcome",
                 app=app, type=self.event_type(event_type), outcome=outcome)
        self.observe("relay_inbound_response_seconds", seconds, help="time to answer an event", outcome=outcome)

    def consumer_lag(self, lags: Mapping[tuple[str, int], int]) -> None:
        """Replace the per-partition lag (partitions no longer owned disappear)."""
        with self._snapshots.lock:
            self._snapshots.lag = dict(lags)

    # reading ------------------------------------------------------------------------------------------

    def _run_callbacks(self) -> None:
        for callback in self._callbacks:
            callback(self)

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition for a scraper's ``Accept`` header (OpenMetrics when asked for): (body, content type)."""
        self._run_callbacks()
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    def render(self) -> str:
        """The Prometheus text exposition (for tests and benchmarks)."""
        return self.exposition()[0].decode()

    def samples(self) -> Iterator[tuple[str, dict[str, str], float]]:
        self._run_callbacks()
        for family in self.registry.collect():
            for sample in family.samples:
                yield sample.name, sample.labels, sample.value

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples named ``name`` whose labels include ``labels`` (0 when none): a counter's or
        gauge's value, for tests and progress lines."""
        wanted = labels.items()
        return sum(value for sample, have, value in self.samples() if sample == name and wanted <= have.items())
