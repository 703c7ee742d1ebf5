"""What ``relay check`` says beyond "the config is valid": warnings about a config that will run but not as meant,
and (``--connect``) whether the broker and each app's token endpoint answer.

Warnings never fail the check (exit 0): a config with no apps or with the example's placeholder credentials is
what a newcomer starts from, and ``relay run --with-sandbox`` uses exactly that. They name the key and say what
will happen, in one line each.

``connect`` reports one :class:`Probe` per thing it tried, each bounded by a timeout: the broker (bootstrap, then
whether the relay's topics exist), then one token request per app (the same request ``relay run`` makes first,
through :class:`~relay.feishu.FeishuClient`, so a wrong secret, an unreachable ``base_url`` or a proxy problem shows
here rather than as failed intents).
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from dataclasses import dataclass
from typing import Final

from relay.config import AppConfig, Config, Secret

# What the example config and the docs put where a real value belongs, and the local sandbox's own placeholder
# (``relay.app.SANDBOX_APP_ID``: "cli_sandbox" / "sandbox-secret"), which only ``relay run --with-sandbox`` uses.
SANDBOX_APP_ID: Final = "cli_sandbox"
PLACEHOLDER_IDS: Final = frozenset({"cli_xxx", ""})
PLACEHOLDER_SECRETS: Final = frozenset({"...", "xxx", "changeme", "change-me", "secret", "sandbox-secret", "todo"})


@dataclass(frozen=True, slots=True)
class ConfigWarning:
    """A config that is valid but will not run as its author probably meant."""

    key: str
    why: str

    def __str__(self) -> str:
        return f"{self.key}: {self.why}"


def _placeholder(secret: Secret | None) -> bool:
    if secret is None:
        return False
    text = secret.reveal().strip().lower()
    return (text in PLACEHOLDER_SECRETS or (text.startswith("<") and text.endswith(">"))
            or text.startswith(("replace-with", "your-", "change-me")))


def _app_warnings(app: AppConfig) -> list[ConfigWarning]:
    found: list[ConfigWarning] = []
    if app.app_id == SANDBOX_APP_ID:
        found.append(ConfigWarning(f"apps[{app.name}].app_id", f"{app.app_id!r} is the local sandbox's placeholder: "
                                   "only `relay run --with-sandbox` can use it (Feishu refuses its token)"))
    elif app.app_id.strip().lower() in PLACEHOLDER_IDS or "xxx" in app.app_id.lower():
        found.append(ConfigWarning(f"apps[{app.name}].app_id",
                                   f"{app.app_id!r} is a placeholder, not an app ID: Feishu will refuse its token"))
    for field in ("app_secret", "verification_token", "encrypt_key"):
        if _placeholder(getattr(app, field)):
            found.append(ConfigWarning(f"apps[{app.name}].{field}", "is a placeholder value, not the app's own"))
    return found


def config_warnings(config: Config) -> list[ConfigWarning]:
    """Every warning for ``config`` (pure; the order is the config's)."""
    found: list[ConfigWarning] = []
    if not config.apps:
        found.append(ConfigWarning("apps", "no [[apps]] configured: every intent is rejected (unknown app) and every "
                                     "event request answered 404"))
    for app in config.apps:
        found.extend(_app_warnings(app))
    return found


@dataclass(frozen=True, slots=True)
class Probe:
    """One thing ``relay check --connect`` tried: ``what`` (``kafka ...``, ``app default``), ok, one line why."""

    what: str
    ok: bool
    detail: str

    def __str__(self) -> str:
        return f"{self.what}: {'ok' if self.ok else 'FAILED'} ({self.detail})"


async def probe_kafka(config: Config, topics: Collection[str], timeout: float) -> Probe:
    """Bootstrap an admin client, count the brokers, and say which of ``topics`` (the relay's) are missing."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaError

    from relay.kafka import client_settings

    what = f"kafka {config.kafka.bootstrap_servers}"
    admin = AIOKafkaAdminClient(**client_settings(config.kafka), request_timeout_ms=int(timeout * 1000))
    try:
        await asyncio.wait_for(admin.start(), timeout)
        existing = set(await asyncio.wait_for(admin.list_topics(), timeout))
        brokers = len(admin._client.cluster.brokers())
    except (KafkaError, TimeoutError, OSError) as err:
        return Probe(what, False, f"unreachable: {err or type(err).__name__}")
    finally:
        await admin.close()
    missing = sorted(set(topics) - existing)
    if missing and not config.kafka.create_topics:
        return Probe(what, False, f"{brokers} broker(s); topics missing and kafka.create_topics is off: "
                                  f"{', '.join(missing)}")
    note = f"; {len(missing)} topic(s) to create at start" if missing else ""
    return Probe(what, True, f"{brokers} broker(s){note}")


async def probe_tokens(config: Config, timeout: float) -> list[Probe]:
    """One tenant_access_token request per app, as ``relay run`` would make it."""
    from relay.feishu import FeishuClient, TokenUnavailable
    from relay.results import feishu_reason

    client = FeishuClient(config)
    await client.start()
    probes: list[Probe] = []
    try:
        for app in config.apps:
            what = f"app {app.name} ({app.app_id} at {config.base_url_for(app)})"
            if app.type == "store":  # its tokens need an app_ticket, pushed to the running relay's event URL
                probes.append(Probe(what, True, "store app: not probed (its tokens need the app_ticket Feishu "
                                    "pushes to the event URL)"))
                continue
            try:
                await asyncio.wait_for(client.token(app.name), timeout)
            except TokenUnavailable as err:
                outcome = err.outcome
                said = outcome.msg if outcome.code is None else feishu_reason(outcome.code, outcome.http_status,
                                                                               outcome.msg)
                probes.append(Probe(what, False, said))
            except TimeoutError:
                probes.append(Probe(what, False, f"no answer from the token endpoint within {timeout:g} s"))
            else:
                probes.append(Probe(what, True, "tenant_access_token obtained"))
    finally:
        await client.close()
    return probes


async def connect(config: Config, topics: Collection[str], timeout: float = 10.0) -> list[Probe]:
    """``relay check --connect``: the broker (and the relay's ``topics``), then each app's token."""
    return [await probe_kafka(config, topics, timeout), *await probe_tokens(config, timeout)]
