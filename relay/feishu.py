"""The Feishu Open API client: one pooled aiohttp session, tenant tokens per app, one attempt per ``send``.

Tokens (docs/feishu-rules.md §1): ``tenant_access_token`` is fetched on demand, cached until ``expire`` minus a margin
(``feishu.token_refresh_margin``, the Python SDK uses 10 min), and refreshed by **one** request per app however
many calls need it at once (a shared future). When Feishu says a token is invalid (99991663/99991664/99991671)
the client drops *that* token (compare-and-drop, so a hundred calls failing on the same stale token cause one
refresh) and the executor retries once.

A refresh that fails (a wrong ``app_secret``, an unreachable or throttled token endpoint) is remembered per app
for a hold: Feishu's ``retry_after`` when it gave one, else :data:`FAILED_TOKEN_HOLD` real seconds. During the hold
every call of that app is answered with the same outcome at once, without a request, so a thousand in-flight
jobs cause one token request per hold, not a storm. A token-endpoint outcome is answered as
:func:`~relay.outcomes.token_error`: it never slows an API's bucket (the limit hit was the token endpoint's), it is
not an attempt of the call (no API request was made), and it keeps ``retry_after`` (the remaining hold while
held) so the executor waits it out.

Timeouts: ``request_timeout`` bounds the whole request; ``connect_timeout`` bounds each TCP connect and, at most
half of ``request_timeout``, the whole connect step (DNS, pool, TLS), so a connect that is too slow fails as
ConnectionTimeoutError (known not written) before the total timeout could fire in it (``relay.outcomes``).

``send`` never raises for an expected answer: it returns an :class:`~relay.outcomes.Outcome` (a network error
becomes a RETRY outcome). Retrying, limits and expiry are the executor's job.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final

import aiohttp
import msgspec
from aiohttp.helpers import get_env_proxy_for_url
from yarl import URL

from relay.calls import Call, FormField
from relay.config import AppConfig, Config
from relay.limits import Requeue
from relay.metrics import Metrics
from relay.outcomes import Outcome, Verdict, classify, network_error, token_error

log = logging.getLogger(__name__)

TOKEN_PATH: Final = "/open-apis/auth/v3/tenant_access_token/internal"
JSON_CONTENT: Final = "application/json; charset=utf-8"
# seconds (real, not scaled by time_scale) a failed token refresh is answered from memory when Feishu gave no reset
FAILED_TOKEN_HOLD: Final = 2.0


class _TokenAnswer(msgspec.Struct):
    code: int = -1
    msg: str = ""
    tenant_access_token: str = ""
    expire: float = 0.0


_token_decoder: Final = msgspec.json.Decoder(_TokenAnswer)


class TokenUnavailable(Exception):
    """The token endpoint did not give a token; ``outcome`` says whether to retry."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.msg)
        self.outcome = outcome


class _Cached:
    __slots__ = ("token", "valid_until")

    def __init__(self, token: str, valid_until: float) -> None:
        self.token = token
        self.valid_until = valid_until


class FeishuClient:
    """Sends one :class:`~relay.calls.Call` for one app and classifies the answer."""

    def __init__(self, config: Config, *, clock: Callable[[], float] = time.monotonic,
                 metrics: Metrics | None = None) -> None:
        """``metrics`` counts each API request (by app, API, outcome, with its latency) and token refresh."""
        self._config = config
        self._clock = clock
        self._metrics = metrics
        self._apps: dict[str, AppConfig] = {app.name: app for app in config.apps}
        self._tokens: dict[str, _Cached] = {}
        self._refreshing: dict[str, asyncio.Future[str]] = {}
        self._refresh_tasks: set[asyncio.Task[None]] = set()
        self._failed: dict[str, tuple[float, Outcome]] = {}  # app -> (held until, the failed refresh's outcome)
        self._session: aiohttp.ClientSession | None = None
        self._proxies: dict[str, tuple[URL | None, aiohttp.BasicAuth | None]] = {}
        # at most one request per pooled connection: waiting here is cheaper than in aiohttp's connector, whose
        # waiters each carry a timeout and are woken one by one on every release
        self._slots = asyncio.Semaphore(config.feishu.max_connections)
        self.token_requests = 0
        self._unavailable: dict[str, str] = {}  # app -> why its last token refresh failed (until one succeeds)

    async def start(self) -> None:
        feishu = self._config.feishu
        connect = min(feishu.connect_timeout, feishu.request_timeout / 2)  # module doc: timeouts
        timeout = aiohttp.ClientTimeout(total=feishu.request_timeout, connect=connect,
                                        sock_connect=feishu.connect_timeout)
        connector = aiohttp.TCPConnector(limit=feishu.max_connections, ttl_dns_cache=300)
        # HTTP(S)_PROXY / NO_PROXY are read once per base URL here, not per request: aiohttp's trust_env does two
        # thread-pool round trips (netrc, proxy lookup) on every request, which halved the relay's throughput
        for app in self._config.apps:
            base = self._config.base_url_for(app)
            if base not in self._proxies:
                try:
                    self._proxies[base] = get_env_proxy_for_url(URL(base))
                except LookupError:
                    self._proxies[base] = (None, None)
        self._session = aiohttp.ClientSession(timeout=timeout, connector=connector, trust_env=False,
                                              raise_for_status=False)

    async def close(self) -> None:
        """Cancel and await in-flight token refreshes (their waiters get a RETRY outcome), then close the session."""
        tasks, waiting = list(self._refresh_tasks), list(self._refreshing.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for future in waiting:  # a task cancelled before it ever ran set nothing
            if not future.done():
                future.set_exception(TokenUnavailable(token_error(network_error(asyncio.CancelledError()))))
                future.exception()  # retrieved: nobody may be waiting
        if self._session is not None:
            await self._session.close()
            self._session = None

    def knows(self, app: str) -> bool:
        return app in self._apps

    def token_problems(self) -> dict[str, str]:
        """Apps whose last tenant_access_token refresh failed (and none has succeeded since), with why; a
        readiness check (``relay.readiness``) asks for their tokens again so a recovery is noticed unprompted."""
        return dict(self._unavailable)

    # tokens -------------------------------------------------------------------------------------------

    async def token(self, app: str) -> str:
        """A valid tenant_access_token for ``app``; at most one refresh request per app at a time.

        Raises :class:`TokenUnavailable`, without a request, while a failed refresh is held (module doc).
        """
        now = self._clock()
        cached = self._tokens.get(app)
        if cached is not None and now < cached.valid_until:
            return cached.token
        failed = self._failed.get(app)
        if failed is not None:
            until, outcome = failed
            if now < until:
                raise TokenUnavailable(_held(outcome, until - now))
            del self._failed[app]
        pending = self._refreshing.get(app)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._refreshing[app] = pending
            task = asyncio.create_task(self._refresh(app, pending))
            self._refresh_tasks.add(task)
            task.add_done_callback(self._refresh_tasks.discard)
            task.add_done_callback(lambda _: self._refreshing.pop(app, None))
        # shield: a caller cancelled while waiting must not cancel the refresh the others share
        return await asyncio.shield(pending)

    def drop_token(self, app: str, token: str) -> None:
        """Forget ``token`` if it is still the cached one (others may have refreshed it already)."""
        cached = self._tokens.get(app)
        if cached is not None and cached.token == token:
            del self._tokens[app]

    async def _refresh(self, app_name: str, result: asyncio.Future[str]) -> None:
        try:
            token, expire = await self._fetch_token(self._apps[app_name])
            margin = self._config.feishu.token_refresh_margin
            # a short-lived token (sandbox time scale) is refreshed at half its life instead
            life = expire - margin if expire > 2 * margin else expire / 2
            self._tokens[app_name] = _Cached(token, self._clock() + life)
            self._failed.pop(app_name, None)
            self._unavailable.pop(app_name, None)
            if self._metrics is not None:
                self._metrics.token_refresh(app_name, ok=True)
            result.set_result(token)
        except TokenUnavailable as err:
            result.set_exception(TokenUnavailable(self._hold(app_name, err.outcome)))
        except asyncio.CancelledError as err:  # close(): waiters must not hang, and nothing is held
            result.set_exception(TokenUnavailable(token_error(network_error(err))))
            raise
        except Exception as err:  # a bug: waiters must not hang, and must not all retry it back to back
            log.exception("token refresh for app %s failed", app_name)
            result.set_exception(TokenUnavailable(self._hold(app_name, token_error(network_error(err)))))
        finally:
            if not result.done():
                result.cancel()
            # a stored exception nobody awaited must not be logged as "never retrieved"
            if result.done() and not result.cancelled():
                result.exception()

    def _hold(self, app_name: str, outcome: Outcome) -> Outcome:
        """Remember a failed refresh for its hold; the outcome its waiters get."""
        hold = outcome.retry_after or FAILED_TOKEN_HOLD
        self._failed[app_name] = (self._clock() + hold, outcome)
        self._unavailable[app_name] = outcome.msg or "no answer"
        if self._metrics is not None:
            self._metrics.token_refresh(app_name, ok=False)
        log.warning("tenant_access_token for app %s unavailable, held for %.1fs: %s", app_name, hold, outcome.msg)
        return _held(outcome, hold)

    async def _fetch_token(self, app: AppConfig) -> tuple[str, float]:
        assert self._session is not None, "FeishuClient.start() was not awaited"
        self.token_requests += 1
        base = self._config.base_url_for(app)
        proxy, proxy_auth = self._proxies.get(base, (None, None))
        body = msgspec.json.encode({"app_id": app.app_id, "app_secret": app.app_secret.reveal()})
        try:
            async with self._session.post(base + TOKEN_PATH, data=body, headers={"Content-Type": JSON_CONTENT},
                                          proxy=proxy, proxy_auth=proxy_auth) as resp:
                raw = await resp.read()
                status, headers = resp.status, resp.headers
        except (aiohttp.ClientError, TimeoutError, OSError) as err:
            raise TokenUnavailable(token_error(network_error(err))) from None
        try:
            answer = _token_decoder.decode(raw)
        except msgspec.DecodeError:
            answer = _TokenAnswer()
        if answer.code == 0 and answer.tenant_access_token and answer.expire > 0:
            log.info("tenant_access_token for app %s refreshed (expires in %.0fs)", app.name, answer.expire)
            return answer.tenant_access_token, answer.expire
        outcome = classify(status, headers, raw, api="auth.tenant_access_token")
        if outcome.verdict is Verdict.OK:  # code 0 but no token: treat as unreadable, permanent
            outcome = msgspec.structs.replace(outcome, verdict=Verdict.PERMANENT, msg="no token in answer")
        raise TokenUnavailable(token_error(outcome))

    # calls --------------------------------------------------------------------------------------------

    async def send(self, app: str, call: Call,
                   admit: Callable[[], Awaitable[None]] | None = None) -> Outcome:
        """Perform ``call`` once for ``app``; every answer (and every failure to get one) is an Outcome.

        ``admit`` is awaited after a pooled connection is ours, just before the request is written: waiting for a
        connection must not make a call late enough to bunch with the calls granted after it. When it raises
        :class:`~relay.limits.Requeue` (a throttle voided the call's grant), the connection is released while the
        call queues again, then ``admit`` runs again."""
        assert self._session is not None, "FeishuClient.start() was not awaited"
        try:
            token = await self.token(app)
        except TokenUnavailable as err:
            return err.outcome
        base = self._config.base_url_for(self._apps[app])
        proxy, proxy_auth = self._proxies.get(base, (None, None))
        headers = {"Authorization": f"Bearer {token}"}
        if not call.form:
            headers["Content-Type"] = JSON_CONTENT  # a form sets its own, with the boundary
        # encoded=True: the path is sent exactly as relay.calls built it (quoted, and for api.call checked in
        # relay.intents); yarl would otherwise re-decode it and collapse "%2e%2e" segments
        url = URL(base + call.path, encoded=True)
        sent: float | None = None  # when the request left (its latency is measured from there)
        try:
            while True:
                try:
                    async with self._slots:
                        if admit is not None:
                            await admit()
                        sent = time.perf_counter()
                        async with self._session.request(
                                call.method, url, params=call.query or None, headers=headers,
                                data=_form(call.form) if call.form else call.body,
                                proxy=proxy, proxy_auth=proxy_auth) as resp:
                            raw = await resp.read()
                            outcome = classify(resp.status, resp.headers, raw, api=call.api)
                    break
                except Requeue as requeue:  # a throttle came while it waited: queue again, not holding a slot
                    await requeue.wait()
        except (aiohttp.ClientError, TimeoutError, OSError) as err:
            outcome = network_error(err)
            self._count(app, call, outcome, sent)
            return outcome
        self._count(app, call, outcome, sent)
        if outcome.verdict is Verdict.REFRESH:
            self.drop_token(app, token)
        return outcome

    def _count(self, app: str, call: Call, outcome: Outcome, sent: float | None) -> None:
        if self._metrics is not None and sent is not None:  # None: it failed before the request left
            self._metrics.feishu_call(app, call.api, outcome, time.perf_counter() - sent)


def _form(fields: tuple[FormField, ...]) -> aiohttp.FormData:
    """A multipart/form-data body, built afresh for each attempt (aiohttp consumes a FormData once sent).

    File bytes go as a BytesIO: aiohttp warns (ResourceWarning) for a plain ``bytes`` part over 1 MB, which
    would also stream from memory, but says "pass a BytesIO"."""
    form = aiohttp.FormData()
    for field in fields:
        value = io.BytesIO(field.value) if isinstance(field.value, bytes) else field.value
        form.add_field(field.name, value, filename=field.filename, content_type=field.content_type)
    return form


def _held(outcome: Outcome, remaining: float) -> Outcome:
    """The failed refresh's outcome answered during its hold: a RETRY waits at least until the hold ends."""
    if outcome.verdict is not Verdict.RETRY:
        return outcome
    return msgspec.structs.replace(outcome, retry_after=remaining)

