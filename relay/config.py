"""The relay's TOML config, decoded strictly with msgspec.

The keys of docs/config.md (``[kafka]``, ``[feishu]``, ``[[apps]]``, ``[http]``) are the public contract; the other
sections (``[outbound]``, ``[inbound]``, ``[previews]``, ``[log]``) are ours and documented in
``deploy/relay.example.toml``.

Every key can be overridden from the environment: ``RELAY_<SECTION>__<KEY>`` (``RELAY_HTTP__PORT=8081``) and
``RELAY_APPS__<NAME>__<KEY>`` for an app (``RELAY_APPS__DEFAULT__APP_SECRET=...``; an app named only in the
environment is created). Values are converted to the key's type (``"8081"`` -> 8081); lists take JSON
(``'["a","b"]'``) or commas (``a,b``); tables take JSON.

Only variables of that shape (``RELAY_``, a section name, then ``__``) are overrides. Every other ``RELAY_*``
variable is ignored, because platforms set their own: Kubernetes gives every pod ``RELAY_PORT=tcp://...``,
``RELAY_SERVICE_HOST``, ``RELAY_PORT_8080_TCP_ADDR``... for a Service named ``relay``, and a relay that refused
them could not start there. A variable of the shape whose section or key does not exist is an error naming the
variable (a misspelt override must not be silently dropped), and so is a value of the wrong type.

Any problem raises :class:`~relay.errors.ConfigError` whose message is one line naming the key. Secrets are
:class:`Secret` values: they print as ``'***'`` in every repr, f-string and log line, and ``reveal()`` is the
only way to the text.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal
from urllib.parse import urlsplit

import msgspec
from msgspec import Meta

from relay.errors import ConfigError


class Secret:
    """A secret string that never prints itself."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return "'***'" if self._value else "''"

    __str__ = __repr__


PositiveFloat = Annotated[float, Meta(gt=0)]
PositiveInt = Annotated[int, Meta(gt=0)]
Port = Annotated[int, Meta(ge=0, le=65535)]
Fraction = Annotated[float, Meta(gt=0, le=1)]


def _check_url(key: str, url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{key}: must be an http(s) URL like https://open.feishu.cn, got {url!r}")


class _Section(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


class KafkaConfig(_Section, frozen=True):
    bootstrap_servers: str = "127.0.0.1:9092"
    group_id: str = "feishu-relay"
    intents_topics: Annotated[list[str], Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: ["feishu.intents"])
    results_topic: str = "feishu.results"
    dead_letter_topic: str = "feishu.dead-letter"
    events_topic: str = "feishu.events"
    callbacks_topic: str = "feishu.callbacks"
    # where services write their answers to callbacks (relay.replies); every replica reads all of it
    replies_topic: str = "feishu.callback-replies"
    # compacted topic remembering when each URL-preview token was last updated (survives restarts)
    preview_memory_topic: str = "feishu.relay.preview-memory"
    # write-ahead journal of calls not safe to repeat, so a kill between call and commit never repeats one
    journal_topic: str = "feishu.relay.journal"
    # compacted topic keeping each store app's latest app_ticket (any replica may receive Feishu's hourly push)
    app_tickets_topic: str = "feishu.relay.app-tickets"
    # compacted single-partition topic where replicas publish their demand and derive their quota shares
    # (feishu.share_mode = "group"), report throttles to each other and share the inbound dedup memory
    coordination_topic: str = "feishu.relay.coordination"
    # compacted topic of the inbound event keys published (digests), so that every replica and restart
    # answers a redelivery as a duplicate (relay.seenlog); "" keeps the dedup memory per process
    dedup_topic: str = "feishu.relay.dedup"
    # static group membership (KIP-345): a stable id per replica (e.g. the pod name); a restart within
    # outbound.session_timeout_ms keeps its partitions without a rebalance. Unset: dynamic membership
    group_instance_id: str | None = None
    client_id: str = "feishu-relay"
    # headers copied from an intent record onto its result record, besides ``traceparent``
    forward_headers: list[str] = msgspec.field(default_factory=list)
    # create the relay's topics at start-up when missing (development; off where topics are managed)
    create_topics: bool = True
    topic_partitions: PositiveInt = 6
    # copies of each topic the relay creates: 1 suits a single local broker; use 3 in production, where
    # acks=all only means "on every in-sync replica" and one replica is one disk
    topic_replication_factor: PositiveInt = 1
    # min.insync.replicas of each topic the relay creates (unset: the broker's default); with acks=all a write
    # fails rather than landing on fewer copies. Topics that already exist are never changed.
    topic_min_insync_replicas: PositiveInt | None = None
    # passed to aiokafka
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: Secret | None = None
    ssl_cafile: str | None = None
    # seconds the broker may go unanswered (a metadata probe every few seconds) before /readyz answers 503
    unreachable_after: PositiveFloat = 30.0

    def __post_init__(self) -> None:
        if self.security_protocol not in ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"):
            raise ValueError("security_protocol: must be one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL")
        for server in self.bootstrap_servers.split(","):
            host, sep, port = server.strip().rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"bootstrap_servers: entry {server.strip()!r} is not host:port")
        replicas = self.topic_min_insync_replicas
        if replicas is not None and replicas > self.topic_replication_factor:
            raise ValueError(f"topic_min_insync_replicas: {replicas} is more than topic_replication_factor "
                             f"{self.topic_replication_factor} (every write would fail)")


class FeishuConfig(_Section, frozen=True):
    base_url: str = "https://open.feishu.cn"
    connect_timeout: PositiveFloat = 3.0
    request_timeout: PositiveFloat = 10.0
    max_connections: PositiveInt = 100
    # refresh a tenant_access_token this many seconds before it expires
    token_refresh_margin: PositiveFloat = 600.0
    # the share of each app's quota this replica may use (several replicas in one group: 1/N each);
    # only with share_mode = "static"
    quota_share: Fraction = 1.0
    # "static": quota_share, fixed. "group": every replica derives its share from the coordination topic
    # (relay.shares): share_floor of each API's quota by owned intent partitions, the rest by calls waiting
    share_mode: Literal["static", "group"] = "static"
    share_floor: Annotated[float, Meta(ge=0, le=1)] = 0.2
    # real seconds between two beats of a replica on the coordination topic (share_mode = "group")
    beat_interval: Annotated[float, Meta(gt=0, le=10)] = 0.5
    # buckets are sized so that burst + rate * (window + limit_jitter) <= limit for every window: the
    # jitter covers timer overshoot, event-loop lag and network variance compressing calls at Feishu
    limit_jitter: Annotated[float, Meta(ge=0, le=1)] = 0.15
    # sustained rate as a share of the longest window's limit (16.25/s of 1000/min at 0.975)
    limit_utilization: Annotated[float, Meta(gt=0, le=1)] = 0.975
    # real seconds: a call that must wait for its app-wide token goes at the next multiple of this at or after
    # its due time, with the others due by then (fewer wake-ups, shared writes; up to this much more latency for
    # a waiting call, never a call over a limit). 0: each waiting call goes at its own due time. Only with
    # share_mode = "static" (group shares reshape the buckets too often for calls to wait for a tick)
    grant_tick: Annotated[float, Meta(ge=0, le=1)] = 0.2
    # divides every Feishu duration (limit windows, preview 5 s rule); only for sandbox tests, 1 for Feishu
    time_scale: PositiveFloat = 1.0
    # app-wide buckets (one per app and API, api.call templates included) alive at once; past it idle ones are
    # forgotten, and an api.call to a new API is rejected while none is idle
    max_api_buckets: PositiveInt = 1024
    # target names (user ids, replied-to messages) remembered as being in a known chat (relay.targets)
    target_memory: PositiveInt = 100_000
    # store apps: tenant_access_tokens (one per app and tenant_key) cached at once; past it the least recently
    # used one not being refreshed is forgotten (fetched again when its tenant calls next)
    max_tenant_tokens: PositiveInt = 10_000
    # store apps: how long a call waits for the app_ticket Feishu pushes after a resend before it is retried
    app_ticket_wait: PositiveFloat = 5.0

    def __post_init__(self) -> None:
        _check_url("base_url", self.base_url)


class AppInboundConfig(_Section, frozen=True):
    # how Feishu delivers this app's events: "webhook" (it posts to the event URL) or "websocket" (the relay
    # holds the app's long connection, relay.ws: no public URL needed; Feishu allows it for self-built apps)
    mode: Literal["webhook", "websocket"] = "webhook"


AppType = Literal["custom", "store"]


class AppConfig(_Section, frozen=True):
    """One Feishu app. ``type``: ``custom`` (企业自建应用, one tenant, its own tenant token) or ``store`` (商店应用,
    installed in many tenants: its intents name a ``tenant_key``, and its tokens come from the app_ticket Feishu
    pushes to its event URL, see :mod:`relay.tickets`)."""

    name: Annotated[str, Meta(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]
    app_id: str
    app_secret: Secret
    type: AppType = "custom"
    verification_token: Secret | None = None
    encrypt_key: Secret | None = None
    base_url: str | None = None
    inbound: AppInboundConfig = msgspec.field(default_factory=AppInboundConfig)

    def __post_init__(self) -> None:
        if self.base_url is not None:
            _check_url("base_url", self.base_url)


class HttpConfig(_Section, frozen=True):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: Port = 8080


# a revoked partition's drain is preceded by the membership's answer (a heartbeat: at most 3 s) and followed by up
# to 5 s for cut-off jobs to stop, then the commit: the group waits rebalance_timeout_ms for all of it, or the
# member is dropped and its commit refused
DRAIN_MARGIN: Final = 10.0


class OutboundConfig(_Section, frozen=True):
    enabled: bool = True
    # records read but not finished; past it the consumer pauses fetching
    max_in_flight: PositiveInt = 2000
    # the same for one partition: a partition over it pauses alone (a hot key's backlog stays on its partition)
    max_in_flight_per_partition: PositiveInt = 500
    # a retried call gives up after this many attempts (API requests; a wait for a tenant token is not one) or
    # this much time since the first, whichever first
    max_attempts: PositiveInt = 8
    max_retry_seconds: PositiveFloat = 300.0
    backoff_base: PositiveFloat = 0.5
    backoff_cap: PositiveFloat = 30.0
    # how long a revoked partition (or SIGTERM) may drain in-flight work before offsets are committed
    drain_timeout: PositiveFloat = 20.0
    commit_interval: PositiveFloat = 0.5
    session_timeout_ms: PositiveInt = 10000
    # Kafka waits this long for a rebalance: it must cover drain_timeout plus DRAIN_MARGIN (checked below)
    rebalance_timeout_ms: PositiveInt = 30000
    # the most characters of commit metadata (finished offsets above the commit point); keep it at or below the
    # broker's offset.metadata.max.bytes (default 4096). A broker refusing it gets half, and a log line
    commit_metadata_max_bytes: Annotated[int, Meta(ge=64)] = 4000
    # a result or dead letter unacknowledged this long makes /readyz answer 503 (the write keeps being retried)
    write_alarm_after: PositiveFloat = 10.0

    # the most bytes an image.upload / file.upload may carry (decoded). The record holds them base64-encoded (4/3
    # as large), and its dead letter must fit the relay's 2 MiB record cap (relay.kafka.MAX_REQUEST_SIZE), so at
    # most 1.5 MB; the intents topic's max.message.bytes must allow the record too (brokers default to 1 MB)
    max_upload_bytes: Annotated[int, Meta(ge=1, le=1_500_000)] = 700_000
    # an upload's ``url`` must resolve to public addresses only, unless in one of these networks (CIDR, e.g. an
    # internal file server's "10.1.2.0/24"); the whole download must end within fetch_timeout seconds
    fetch_allowed_networks: list[Annotated[str, Meta(pattern=r"^[0-9A-Fa-f.:]+(/\d{1,3})?$")]] = msgspec.field(
        default_factory=list)
    fetch_timeout: PositiveFloat = 15.0

    def __post_init__(self) -> None:
        for network in self.fetch_allowed_networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(f"fetch_allowed_networks: {network!r} is not an IP network (CIDR)") from None
        if self.drain_timeout + DRAIN_MARGIN > self.rebalance_timeout_ms / 1000:
            raise ValueError(
                f"drain_timeout: {self.drain_timeout:g}s does not fit in rebalance_timeout_ms "
                f"({self.rebalance_timeout_ms} ms) with {DRAIN_MARGIN:g}s left to cut off and commit; "
                f"lower it or raise rebalance_timeout_ms")


class InboundConfig(_Section, frozen=True):
    enabled: bool = True
    max_body_bytes: PositiveInt = 1 << 20
    # a body not received within this many seconds of its headers gets 408 (Feishu itself gives up at 3 s)
    read_timeout: PositiveFloat = 3.0
    # accept timestamps this far back (Feishu redelivers at 15 s, 5 min, 1 h, 6 h) and ahead
    timestamp_tolerance: PositiveFloat = 7 * 3600.0
    future_tolerance: PositiveFloat = 300.0
    # from a request's arrival to its answer: an event not acknowledged by Kafka by then gets 503 (Feishu
    # redelivers); a callback gets its fallback answer and its publish goes on (Feishu waits 3 s). A callback
    # whose reply is awaited (callback_replies) waits for Kafka up to reply_timeout instead.
    publish_timeout: PositiveFloat = 2.0
    dedup_ttl: PositiveFloat = 7 * 3600.0
    # 91 bytes an entry (relay.dedup, measured): the default takes 87 MiB when full (95 MiB of RSS)
    dedup_max_entries: PositiveInt = 1_000_000
    # event_type -> topic; events not listed go to kafka.events_topic
    routes: dict[str, str] = msgspec.field(default_factory=dict)
    # event types answered synchronously and published to kafka.callbacks_topic
    callback_types: list[str] = msgspec.field(
        default_factory=lambda: ["card.action.trigger", "url.preview.get"])
    # long connection (apps with inbound.mode = "websocket"): the endpoint call and the WebSocket handshake
    # each get this long; the connection counts as dead when nothing arrived for PingInterval + ws_liveness_grace
    ws_connect_timeout: PositiveFloat = 15.0
    ws_liveness_grace: PositiveFloat = 30.0
    # fragments of a split event are kept this long for the rest (Feishu's SDKs: 5-10 s)
    ws_fragment_ttl: PositiveFloat = 10.0
    # data frames being published at once per connection; past it a frame is answered 500 (Feishu redelivers)
    ws_max_in_flight: PositiveInt = 1000
    # wait for a service's answer to each callback on kafka.replies_topic (relay.replies); false: answer the
    # fallback as soon as Kafka has the callback
    callback_replies: bool = True
    # from a callback's arrival to its answer, reply or not (Feishu gives up at 3 s and shows error 200671)
    reply_timeout: Annotated[float, Meta(gt=0, lt=3)] = 2.5
    # the answer when no valid reply came in time: {} (no change), or for a card click this toast when set
    fallback_toast: str = ""
    fallback_toast_type: Literal["info", "success", "error", "warning"] = "info"
    # a reply larger than this is malformed (a card may be at most 30 KB)
    max_answer_bytes: PositiveInt = 30 * 1024

    def __post_init__(self) -> None:
        if self.dedup_ttl < self.timestamp_tolerance:
            raise ValueError("dedup_ttl: must be at least timestamp_tolerance (a signed request replayed after "
                             "its dedup entry expired, but within the tolerance, would be published again)")


class PreviewsConfig(_Section, frozen=True):
    # Feishu: one update per preview token per 5 s (docs/feishu-rules.md §5.4); kept slightly above with the margin
    token_interval: PositiveFloat = 5.0
    # real seconds a preview call may take from writing its claim to the memory topic to sending its request;
    # past it the request is not sent (claimed again later). Claims on a token are this much further apart.
    claim_window: PositiveFloat = 0.5
    # url_preview intents are read past outbound.max_in_flight (a pending one costs its token, not a slot): reading
    # pauses while this many tokens have intents waiting or a call in flight (one read overshoots by 9 at most).
    # A token is one entry however many intents it folds; 10,000 is ~5 minutes of the API's budget (35 tokens/s)
    max_pending_tokens: PositiveInt = 10_000


class LogConfig(_Section, frozen=True):
    # "json" (one object per line), "text", or "auto": json unless stderr is a terminal; --log-format wins
    format: Literal["auto", "json", "text"] = "auto"
    # seconds a repeated aiokafka line or WARNING is summarised over: the first is written, the rest counted
    repeat_interval: PositiveFloat = 30.0


class Config(_Section, frozen=True):
    kafka: KafkaConfig = msgspec.field(default_factory=KafkaConfig)
    feishu: FeishuConfig = msgspec.field(default_factory=FeishuConfig)
    apps: list[AppConfig] = msgspec.field(default_factory=list)
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
    outbound: OutboundConfig = msgspec.field(default_factory=OutboundConfig)
    inbound: InboundConfig = msgspec.field(default_factory=InboundConfig)
    previews: PreviewsConfig = msgspec.field(default_factory=PreviewsConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for app in self.apps:
            if app.name in seen:
                raise ValueError(f"apps: duplicate app name {app.name!r}")
            seen.add(app.name)

    def app(self, name: str) -> AppConfig | None:
        for app in self.apps:
            if app.name == name:
                return app
        return None

    def base_url_for(self, app: AppConfig) -> str:
        return (app.base_url or self.feishu.base_url).rstrip("/")


def check_inbound(config: Config) -> list[str]:
    """The event URL's demands on the apps: raise ConfigError for one it would serve without a verification token.

    Without a token anyone can post events for the app and the relay would publish them, so ``relay check`` and
    ``relay run`` refuse such a config (only while ``http`` and ``inbound`` are enabled). Returns one warning per
    app without an encrypt key: Feishu neither signs nor encrypts its requests then, so the token, which travels
    in every request, is their only check (no signature, no timestamp window, events readable on the way).
    """
    if not (config.http.enabled and config.inbound.enabled):
        return []
    for app in config.apps:
        if app.inbound.mode == "webhook" and not app.verification_token:
            raise ConfigError(f"apps[{app.name}].verification_token",
                              "required while inbound is enabled (without it anyone can post events for this "
                              "app); copy it from the Feishu console, or set inbound.enabled = false")
    return [warning for app in config.apps if app.inbound.mode == "webhook" and (warning := unsigned_warning(app))]


def unsigned_warning(app: AppConfig) -> str | None:
    """The warning for an app without an encrypt key (see :func:`check_inbound`), or None."""
    if app.encrypt_key:
        return None
    return (f"apps[{app.name}] has no encrypt_key: its events arrive unsigned and unencrypted, checked only by "
            "the verification token they carry (set an Encrypt Key in the Feishu console and here)")


def _dec_hook(type_: type, obj: Any) -> Any:
    if type_ is Secret:
        if isinstance(obj, Secret):
            return obj
        if isinstance(obj, str):
            return Secret(obj)
        raise ValueError(f"Expected `str`, got `{type(obj).__name__}`")
    raise NotImplementedError(type_)


_SECTIONS: Final[dict[str, type[msgspec.Struct]]] = {
    "kafka": KafkaConfig, "feishu": FeishuConfig, "http": HttpConfig, "outbound": OutboundConfig,
    "inbound": InboundConfig, "previews": PreviewsConfig, "log": LogConfig,
}


def _env_value(raw: str, annotation: Any) -> Any:
    """An env string as the key's type; scalars are left to msgspec's lax conversion."""
    text = str(annotation)
    if raw.startswith(("[", "{")):
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    if "list[" in text:
        return [part.strip() for part in raw.split(",") if part.strip()]
    return raw


def _field_types(cls: type[msgspec.Struct]) -> dict[str, Any]:
    return {f.name: f.type for f in msgspec.structs.fields(cls)}


def _env_key(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", name).upper()


# RELAY_<SECTION>__<REST>: a section-like word, then a double underscore. Kubernetes' service variables
# (RELAY_PORT, RELAY_SERVICE_HOST, RELAY_PORT_8080_TCP_ADDR) have no double underscore, so they never match.
_OVERRIDE: Final = re.compile(r"^RELAY_(?P<section>[A-Za-z][A-Za-z0-9]*)__(?P<rest>.*)$")


def apply_env(data: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """Return ``data`` with every override variable applied (see the module docstring).

    Variables not shaped ``RELAY_<SECTION>__...`` are ignored; a shaped one naming an unknown section or key
    raises ConfigError naming the variable.
    """
    return _apply_env(data, env)[0]


def _apply_env(data: dict[str, Any], env: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """``apply_env``, plus where each overridden key came from (``{"http.port": "RELAY_HTTP__PORT"}``)."""
    data = dict(data)
    origins: dict[str, str] = {}
    for var in sorted(env):
        match = _OVERRIDE.match(var)
        if match is None:
            continue
        section, parts = match["section"].lower(), match["rest"].split("__")
        if section == "apps":
            if len(parts) != 2 or not parts[0] or not parts[1]:
                raise ConfigError(var, "expected RELAY_APPS__<NAME>__<KEY>")
            origins[_apply_app_env(data, var, parts[0], parts[1].lower(), env[var])] = var
            continue
        if section not in _SECTIONS:
            raise ConfigError(var, f"unknown config section {section!r} (known: apps, {', '.join(_SECTIONS)})")
        if len(parts) != 1 or not parts[0]:
            raise ConfigError(var, "expected RELAY_<SECTION>__<KEY>")
        key = parts[0].lower()
        types = _field_types(_SECTIONS[section])
        if key not in types:
            raise ConfigError(f"{section}.{key}", f"unknown key (from {var})")
        table = data.get(section)
        table = dict(table) if isinstance(table, dict) else {}
        table[key] = _env_value(env[var], types[key])
        data[section] = table
        origins[f"{section}.{key}"] = var
    return data, origins


def _apply_app_env(data: dict[str, Any], var: str, env_name: str, key: str, value: str) -> str:
    """Set one app key from ``var``; returns the key as errors name it (``apps[default].app_id``)."""
    types = _field_types(AppConfig)
    if key not in types or key == "name":
        raise ConfigError(f"apps.{env_name.lower()}.{key}", f"unknown key (from {var})")
    apps = data.get("apps")
    apps = [dict(a) if isinstance(a, dict) else a for a in apps] if isinstance(apps, list) else []
    for app in apps:
        if isinstance(app, dict) and _env_key(str(app.get("name", ""))) == env_name.upper():
            app[key] = _env_value(value, types[key])
            name = str(app.get("name", ""))
            break
    else:
        name = env_name.lower()
        apps.append({"name": name, key: _env_value(value, types[key])})
    data["apps"] = apps
    return f"apps[{name}].{key}"


def _with_origin(err: ConfigError, origins: Mapping[str, str]) -> ConfigError:
    """``err`` naming the variable its key came from, when an override set that key (or a table holding it)."""
    for key, var in origins.items():
        if err.key == key or err.key.startswith((key + ".", key + "[")):
            return ConfigError(err.key, f"{err.why} (from {var})")
    return err


_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")


def _key_of(path: str, data: Mapping[str, Any]) -> str:
    """``$.apps[0].app_id`` -> ``apps[default].app_id`` (the app's name when it has one)."""
    path = path.lstrip(".")

    def name(match: re.Match[str]) -> str:
        index = int(match.group(1))
        apps = data.get("apps")
        if isinstance(apps, list) and index < len(apps) and isinstance(apps[index], dict):
            app_name = apps[index].get("name")
            if isinstance(app_name, str):
                return f"apps[{app_name}]"
        return f"apps[{index}]"

    return re.sub(r"^apps\[(\d+)\]", name, path)


def _explain(err: msgspec.ValidationError, data: Mapping[str, Any]) -> ConfigError:
    message = str(err)
    match = _PATH.search(message)
    key = _key_of(match.group("path"), data) if match else ""
    why = message[: match.start()] if match else message
    unknown = re.match(r"Object contains unknown field `([^`]+)`", why)
    if unknown:
        return ConfigError(f"{key}.{unknown.group(1)}".lstrip("."), "unknown key")
    missing = re.match(r"Object missing required field `([^`]+)`", why)
    if missing:
        return ConfigError(f"{key}.{missing.group(1)}".lstrip("."), "missing required key")
    field = re.match(r"([a-z_]+): (.*)", why)
    if field:  # a __post_init__ check names its own field
        return ConfigError(f"{key}.{field.group(1)}".lstrip("."), field.group(2))
    why = why.replace("`", "")
    return ConfigError(key or "config", why[:1].lower() + why[1:])


def parse_config(data: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Config:
    """Decode an already-parsed TOML table (plus env overrides) into a :class:`Config`."""
    merged, origins = _apply_env(dict(data), os.environ if env is None else env)
    try:
        return msgspec.convert(merged, Config, strict=False, dec_hook=_dec_hook)
    except msgspec.ValidationError as err:
        raise _with_origin(_explain(err, merged), origins) from None


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read, override and validate a config file; raises ConfigError with one line naming the key."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as err:
        raise ConfigError("", f"cannot read config {os.fspath(path)!r}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError("", f"config {os.fspath(path)!r} is not UTF-8") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError("", f"{os.fspath(path)} is not valid TOML: {err}") from None
    return parse_config(data, env)


def redacted(config: Config) -> dict[str, Any]:
    """The config as plain data with every secret shown as ``***`` (for ``relay check --print``)."""

    def enc(obj: Any) -> Any:
        if isinstance(obj, Secret):
            return "***" if obj else ""
        raise NotImplementedError(type(obj))

    result: dict[str, Any] = msgspec.to_builtins(config, enc_hook=enc)
    return result
