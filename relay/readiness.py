"""``/healthz``, ``/readyz``, ``/metrics``, and the watches that make ``/readyz`` tell the truth.

``/healthz`` is 200 while the process serves HTTP (a liveness probe: restart it when not). ``/readyz`` is 200
only while every enabled part has started and none has died, **and** no check reports a problem:

- the broker has answered a metadata probe within ``kafka.unreachable_after`` seconds (:class:`BrokerWatch`,
  probed every few seconds by :func:`watch_broker`);
- every app's last tenant_access_token refresh succeeded (a failed one is asked again by
  :func:`retry_tokens`, so a recovered token endpoint turns ``/readyz`` back to 200 without waiting for traffic);
- the outbound loop's own problems (results that cannot be written).

The answer is 503 with the first problem as ``reason``; 200 again once none is left (a part that died does not
recover: the process exits 1). Each change of the broker's standing is one log line.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from aiohttp import web

from relay.metrics import Metrics

log = logging.getLogger(__name__)


class Health:
    """``/healthz``: the process is up. ``/readyz``: every enabled part has started, none has died and none
    reports a problem (a check returning a reason, e.g. results that cannot be written)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.ready = False
        self.problem: str | None = None
        self.checks: list[Callable[[], str | None]] = []

    def reason(self) -> str | None:
        """Why the relay is not ready (None: it is)."""
        if not self.ready:
            return self.problem or "starting"
        return self.problem or next((reason for check in self.checks if (reason := check())), None)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        problem = self.reason()
        if problem is None:
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready", "reason": problem}, status=503)

    async def metrics_text(self, request: web.Request) -> web.Response:
        body, content_type = self.metrics.exposition(request.headers.get("Accept"))
        return web.Response(body=body, headers={"Content-Type": content_type})

    def install(self, app: web.Application) -> None:
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics_text)


class BrokerWatch:
    """When the broker last answered; a problem once it has not for ``unreachable_after`` seconds.

    Starts as answered (the relay's producer has just connected), so a fresh relay is not unready."""

    def __init__(self, unreachable_after: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.unreachable_after = unreachable_after
        self._clock = clock
        self._answered = clock()
        self._reported = False  # the outage has been logged

    def answered(self) -> None:
        if self._reported:
            log.info("the Kafka broker answers again after %.0fs", self._clock() - self._answered)
            self._reported = False
        self._answered = self._clock()

    def problem(self) -> str | None:
        silent = self._clock() - self._answered
        if silent < self.unreachable_after:
            return None
        if not self._reported:
            log.error("the Kafka broker has not answered for %.0fs: /readyz answers 503", silent)
            self._reported = True
        return f"Kafka broker unreachable for {silent:.0f}s (kafka.unreachable_after = {self.unreachable_after:g})"


def probe_interval(unreachable_after: float) -> float:
    """A third of the allowed silence (0.5 to 5 s): an outage is seen at most a third late."""
    return min(5.0, max(0.5, unreachable_after / 3))


async def watch_broker(watch: BrokerWatch, probe: Callable[[], Awaitable[bool]], interval: float, *,
                       sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
    """Forever: ``probe()`` (True: the broker answered), bounded by ``interval``; then wait ``interval``."""
    while True:
        try:
            answered = await asyncio.wait_for(probe(), interval)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # an aiokafka error or a timeout: not answered; the probe runs again
            log.debug("broker probe failed: %r", err)
            answered = False
        if answered:
            watch.answered()
        watch.problem()  # logs the outage once, as it begins
        await sleep(interval)


class Tokens(Protocol):
    """The Feishu client's view of tenant tokens (``relay.feishu.FeishuClient``)."""

    def token_problems(self) -> dict[str, str]: ...

    async def token_problem_arises(self) -> None: ...

    async def token(self, app: str) -> str: ...


def token_problem(tokens: Tokens) -> str | None:
    """The first app whose tenant_access_token cannot be obtained, and why."""
    problems = tokens.token_problems()
    for app, why in sorted(problems.items()):
        return f"apps[{app}]: tenant_access_token unavailable ({why})"
    return None


async def retry_tokens(tokens: Tokens, interval: float, *,
                       sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
    """Forever: ask again for each token whose last refresh failed (the client holds a failed one for a while,
    so this sends at most one request per app per hold). While every token is fine it sleeps until one is not
    (an idle relay does not wake for it)."""
    while True:
        await tokens.token_problem_arises()
        await sleep(interval)
        await asyncio.gather(*(_quietly(tokens.token(app)) for app in tokens.token_problems()))


async def _quietly(token: Awaitable[str]) -> None:
    try:
        await token
    except Exception as err:  # TokenUnavailable: still failing; the client logged it once per hold
        log.debug("token retry failed: %s", err)

