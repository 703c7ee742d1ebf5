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

Store apps (``[[apps]] type = "store"``, docs/feishu-rules.md §1.1): a call names its ``tenant``. Its
``tenant_access_token`` is cached per (app, tenant) and fetched from ``POST /open-apis/auth/v3/tenant_access_token``
with the app's ``app_access_token``, itself cached once per app and fetched from ``POST
/open-apis/auth/v3/app_access_token`` with the latest ``app_ticket`` (:mod:`relay.tickets`). Each is refreshed
ahead of its expiry by one request however many calls need it (the same shared-future shape as above; the app
token's refresh is shared by every tenant refreshing at once). Without a ticket, or when Feishu calls it invalid
(10012), the client asks Feishu to resend it (``POST /open-apis/auth/v3/app_ticket/resend``, at most once per
``feishu.app_ticket_wait``) and waits up to ``feishu.app_ticket_wait`` for it to arrive on the event URL; none by
then is a RETRY token outcome (the call waits and tries again). At most ``feishu.max_tenant_tokens`` tenant
tokens are cached: past it the least recently used one not being refreshed is forgotten.

``send`` never raises for an expected answer: it returns an :class:`~relay.outcomes.Outcome` (a network error
becomes a RETRY outcome). Retrying, limits and expiry are the executor's job.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections import OrderedDict
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
from relay.tickets import TicketBook, Tickets

log = logging.getLogger(__name__)

TOKEN_PATH: Final = "/open-apis/auth/v3/tenant_access_token/internal"
# store apps (auth-v3/auth/app_access_token, tenant_access_token/create, app_ticket_resend)
APP_TOKEN_PATH: Final = "/open-apis/auth/v3/app_access_token"
STORE_TOKEN_PATH: Final = "/open-apis/auth/v3/tenant_access_token"
RESEND_PATH: Final = "/open-apis/auth/v3/app_ticket/resend"
# the app_access_token endpoint's "app_ticket invalid" (the Go SDK's core/constants.go: resend on it)
TICKET_INVALID: Final = 10012
JSON_CONTENT: Final = "application/json; charset=utf-8"
# request URLs kept for reuse: most calls are of a few paths (message.send's is one), and yarl's URL with its
# query costs more to build than to look up; paths with ids in them churn it, so it is cleared when full
_MAX_URLS: Final = 1024
# seconds (real, not scaled by time_scale) a failed token refresh is answered from memory when Feishu gave no reset
FAILED_TOKEN_HOLD: Final = 2.0


class _TokenAnswer(msgspec.Struct):
    code: int = -1
    msg: str = ""
    tenant_access_token: str = ""
    app_access_token: str = ""
    expire: float = 0.0


_token_decoder: Final = msgspec.json.Decoder(_TokenAnswer)


TokenKey = tuple[str, str | None]  # (app, tenant): tenant None for a custom app


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
                 metrics: Metrics | None = None, tickets: Tickets | None = None) -> None:
        """``metrics`` counts each API request (by app, API, outcome, with its latency) and token refresh;
        ``tickets``: where store apps' app_tickets are found (:class:`~relay.tickets.KafkaTickets` when the
        relay runs; an empty book by default)."""
        self._config = config
        self._clock = clock
        self._metrics = metrics
        self._apps: dict[str, AppConfig] = {app.name: app for app in config.apps}
        self._tickets: Tickets = tickets if tickets is not None else TicketBook()
        # (app, tenant) -> token; tenant None for a custom app. Least recently used first (max_tenant_tokens)
        self._tokens: OrderedDict[TokenKey, _Cached] = OrderedDict()
        self._refreshing: dict[TokenKey, asyncio.Future[str]] = {}
        self._refresh_tasks: set[asyncio.Task[None]] = set()
        # (app, tenant) -> (held until, the failed refresh's outcome); least recently failed first
        self._failed: OrderedDict[TokenKey, tuple[float, Outcome]] = OrderedDict()
        self._app_tokens: dict[str, _Cached] = {}  # store app -> app_access_token
        self._app_refreshing: dict[str, asyncio.Future[str]] = {}
        self._resent: dict[str, float] = {}  # store app -> when a resend was last asked for
        self._session: aiohttp.ClientSession | None = None
        self._proxies: dict[str, tuple[URL | None, aiohttp.BasicAuth | None]] = {}
        self._urls: dict[tuple[object, ...], URL] = {}
        # at most one request per pooled connection: waiting here is cheaper than in aiohttp's connector, whose
        # waiters each carry a timeout and are woken one by one on every release
        self._slots = asyncio.Semaphore(config.feishu.max_connections)
        self.token_requests = 0  # tenant_access_token requests (both endpoints)
        self.app_token_requests = 0
        self.resends = 0
        # custom app -> why its last token refresh failed (until one succeeds); a store app's tenants come and go
        # with their installs, so one tenant's token does not make the relay unready
        self._unavailable: dict[str, str] = {}
        self._became_unavailable = asyncio.Event()  # set when an app joins _unavailable

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

    async def token_problem_arises(self) -> None:
        """Return once some app's tenant_access_token is unavailable (at once if one is): the readiness retry
        sleeps here instead of waking every hold to find nothing to ask for."""
        while not self._unavailable:
            self._became_unavailable.clear()
            await self._became_unavailable.wait()

    # tokens -------------------------------------------------------------------------------------------

    async def token(self, app: str, tenant: str | None = None) -> str:
        """A valid tenant_access_token for ``app`` (a store app: for its ``tenant``); at most one refresh request
        per app and tenant at a time.

        Raises :class:`TokenUnavailable`, without a request, while a failed refresh is held (module doc).
        """
        key = (app, tenant)
        now = self._clock()
        cached = self._tokens.get(key)
        if cached is not None and now < cached.valid_until:
            if tenant is not None:
                self._tokens.move_to_end(key)
            return cached.token
        failed = self._failed.get(key)
        if failed is not None:
            until, outcome = failed
            if now < until:
                raise TokenUnavailable(_held(outcome, until - now))
            del self._failed[key]
        pending = self._refreshing.get(key)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._refreshing[key] = pending
            task = asyncio.create_task(self._refresh(key, pending))
            self._refresh_tasks.add(task)
            task.add_done_callback(self._refresh_tasks.discard)
            task.add_done_callback(lambda _: self._refreshing.pop(key, None))
        # shield: a caller cancelled while waiting must not cancel the refresh the others share
        return await asyncio.shield(pending)

    def drop_token(self, app: str, token: str, tenant: str | None = None) -> None:
        """Forget ``token`` if it is still the cached one (others may have refreshed it already)."""
        cached = self._tokens.get((app, tenant))
        if cached is not None and cached.token == token:
            del self._tokens[(app, tenant)]

    def _life(self, expire: float) -> float:
        """Seconds a token that lives ``expire`` seconds is used before it is refreshed."""
        margin = self._config.feishu.token_refresh_margin
        # a short-lived token (sandbox time scale) is refreshed at half its life instead
        return expire - margin if expire > 2 * margin else expire / 2

    def _keep(self, key: TokenKey, token: str, expire: float) -> None:
        """Cache a tenant token; past ``feishu.max_tenant_tokens`` forget the least recently used idle ones."""
        self._tokens[key] = _Cached(token, self._clock() + self._life(expire))
        self._tokens.move_to_end(key)
        cap = self._config.feishu.max_tenant_tokens
        while len(self._tokens) > cap:
            oldest = next(iter(self._tokens))
            if oldest == key:
                break
            del self._tokens[oldest]
        while len(self._failed) > cap:
            self._failed.popitem(last=False)

    async def _refresh(self, key: TokenKey, result: asyncio.Future[str]) -> None:
        app_name, tenant = key
        try:
            app = self._apps[app_name]
            if app.type == "store":
                if tenant is None:
                    raise TokenUnavailable(_permanent(f"store app {app_name} needs a tenant_key"))
                token, expire = await self._fetch_store_token(app, tenant)
            else:
                if tenant is not None:
                    raise TokenUnavailable(_permanent(f"custom app {app_name} has no tenant_key {tenant!r}"))
                token, expire = await self._fetch_token(app)
            self._keep(key, token, expire)
            self._failed.pop(key, None)
            if tenant is None:
                self._unavailable.pop(app_name, None)
            if self._metrics is not None:
                self._metrics.token_refresh(app_name, ok=True)
            result.set_result(token)
        except TokenUnavailable as err:
            result.set_exception(TokenUnavailable(self._hold(key, err.outcome)))
        except asyncio.CancelledError as err:  # close(): waiters must not hang, and nothing is held
            result.set_exception(TokenUnavailable(token_error(network_error(err))))
            raise
        except Exception as err:  # a bug: waiters must not hang, and must not all retry it back to back
            log.exception("token refresh for app %s failed", app_name)
            result.set_exception(TokenUnavailable(self._hold(key, token_error(network_error(err)))))
        finally:
            if not result.done():
                result.cancel()
            # a stored exception nobody awaited must not be logged as "never retrieved"
            if result.done() and not result.cancelled():
                result.exception()

    def _hold(self, key: TokenKey, outcome: Outcome) -> Outcome:
        """Remember a failed refresh for its hold; the outcome its waiters get."""
        hold = outcome.retry_after or FAILED_TOKEN_HOLD
        self._failed[key] = (self._clock() + hold, outcome)
        self._failed.move_to_end(key)
        app_name, tenant = key
        if tenant is None:
            self._unavailable[app_name] = outcome.msg or "no answer"
            self._became_unavailable.set()
        if self._metrics is not None:
            self._metrics.token_refresh(app_name, ok=False)
        log.warning("tenant_access_token for app %s%s unavailable, held for %.1fs: %s", app_name,
                    f" tenant {tenant}" if tenant is not None else "", hold, outcome.msg)
        return _held(outcome, hold)

    async def _fetch_token(self, app: AppConfig) -> tuple[str, float]:
        self.token_requests += 1
        answer, outcome = await self._post(app, TOKEN_PATH, {"app_id": app.app_id,
                                                             "app_secret": app.app_secret.reveal()})
        if answer.tenant_access_token and answer.expire > 0:
            log.info("tenant_access_token for app %s refreshed (expires in %.0fs)", app.name, answer.expire)
            return answer.tenant_access_token, answer.expire
        raise TokenUnavailable(_no_token(outcome))

    async def _post(self, app: AppConfig, path: str, fields: dict[str, str]) -> tuple[_TokenAnswer, Outcome]:
        """POST ``fields`` to an auth endpoint: the answer read leniently, and its classified outcome."""
        assert self._session is not None, "FeishuClient.start() was not awaited"
        base = self._config.base_url_for(app)
        proxy, proxy_auth = self._proxies.get(base, (None, None))
        try:
            async with self._session.post(base + path, data=msgspec.json.encode(fields),
                                          headers={"Content-Type": JSON_CONTENT},
                                          proxy=proxy, proxy_auth=proxy_auth) as resp:
                raw = await resp.read()
                status, headers = resp.status, resp.headers
        except (aiohttp.ClientError, TimeoutError, OSError) as err:
            raise TokenUnavailable(token_error(network_error(err))) from None
        try:
            answer = _token_decoder.decode(raw)
        except msgspec.DecodeError:
            answer = _TokenAnswer()
        return answer, classify(status, headers, raw, api="auth.tenant_access_token")

    # store apps ---------------------------------------------------------------------------------------

    async def _fetch_store_token(self, app: AppConfig, tenant: str) -> tuple[str, float]:
        """A store app's tenant token for ``tenant``; an app token Feishu refuses is fetched again once."""
        for _ in range(2):
            app_token = await self._app_token(app)
            self.token_requests += 1
            answer, outcome = await self._post(app, STORE_TOKEN_PATH, {"app_access_token": app_token,
                                                                       "tenant_key": tenant})
            if answer.tenant_access_token and answer.expire > 0:
                log.info("tenant_access_token for app %s tenant %s refreshed (expires in %.0fs)", app.name, tenant,
                         answer.expire)
                return answer.tenant_access_token, answer.expire
            if outcome.verdict is not Verdict.REFRESH:
                break
            cached = self._app_tokens.get(app.name)  # the app token was refused: drop it, fetch it again
            if cached is not None and cached.token == app_token:
                del self._app_tokens[app.name]
        raise TokenUnavailable(_no_token(outcome))

    async def _app_token(self, app: AppConfig) -> str:
        """The store app's app_access_token: cached until its refresh time, one request at a time."""
        cached = self._app_tokens.get(app.name)
        if cached is not None and self._clock() < cached.valid_until:
            return cached.token
        pending = self._app_refreshing.get(app.name)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._app_refreshing[app.name] = pending
            try:
                token, expire = await self._fetch_app_token(app)
                self._app_tokens[app.name] = _Cached(token, self._clock() + self._life(expire))
                pending.set_result(token)
            except BaseException as err:
                pending.set_exception(err if isinstance(err, TokenUnavailable)
                                      else TokenUnavailable(token_error(network_error(err))))
                pending.exception()  # retrieved: nobody else may be waiting
                raise
            finally:
                self._app_refreshing.pop(app.name, None)
            return token
        return await asyncio.shield(pending)

    async def _fetch_app_token(self, app: AppConfig) -> tuple[str, float]:
        """POST app_access_token with the latest ticket; without one, or with one Feishu calls invalid, ask
        for a resend and wait for the ticket (module doc)."""
        outcome: Outcome | None = None
        for _ in range(2):
            ticket = self._tickets.get(app.app_id)
            if ticket is None:
                await self._resend(app)
                ticket = await self._tickets.wait(app.app_id, self._config.feishu.app_ticket_wait)
                if ticket is None:
                    raise TokenUnavailable(token_error(_no_ticket(app)))
            self.app_token_requests += 1
            answer, outcome = await self._post(app, APP_TOKEN_PATH, {
                "app_id": app.app_id, "app_secret": app.app_secret.reveal(), "app_ticket": ticket})
            if answer.app_access_token and answer.expire > 0:
                log.info("app_access_token for app %s refreshed (expires in %.0fs)", app.name, answer.expire)
                return answer.app_access_token, answer.expire
            if answer.code != TICKET_INVALID:
                break
            log.warning("app_ticket of app %s refused as invalid (10012): asking Feishu to resend it", app.name)
            self._tickets.drop(app.app_id, ticket)
            self._resent.pop(app.name, None)  # resend at once, whenever the last was
        assert outcome is not None
        if outcome.code == TICKET_INVALID:  # a fresh ticket refused too: wait and try again, like a missing one
            outcome = _no_ticket(app)
        raise TokenUnavailable(_no_token(outcome))

    async def _resend(self, app: AppConfig) -> None:
        """Ask Feishu to push the app_ticket again, at most once per ``feishu.app_ticket_wait``."""
        now = self._clock()
        last = self._resent.get(app.name)
        if last is not None and now - last < self._config.feishu.app_ticket_wait:
            return
        self._resent[app.name] = now
        self.resends += 1
        answer, outcome = await self._post(app, RESEND_PATH, {"app_id": app.app_id,
                                                              "app_secret": app.app_secret.reveal()})
        if answer.code == 0:
            log.info("app_ticket of app %s: resend asked for (it arrives on the event URL)", app.name)
        elif outcome.verdict is Verdict.PERMANENT:  # a wrong secret: no ticket will come
            raise TokenUnavailable(token_error(outcome))
        else:
            log.warning("app_ticket resend for app %s failed: %s", app.name, outcome.msg)

    # calls --------------------------------------------------------------------------------------------

    async def send(self, app: str, call: Call,
                   admit: Callable[[], Awaitable[None]] | None = None, *, tenant: str | None = None) -> Outcome:
        """Perform ``call`` once for ``app``; every answer (and every failure to get one) is an Outcome.

        ``admit`` is awaited after a pooled connection is ours, just before the request is written: waiting for a
        connection must not make a call late enough to bunch with the calls granted after it. When it raises
        :class:`~relay.limits.Requeue` (a throttle voided the call's grant), the connection is released while the
        call queues again, then ``admit`` runs again. A store app's call is made as its ``tenant``."""
        assert self._session is not None, "FeishuClient.start() was not awaited"
        try:
            token = await self.token(app, tenant)
        except TokenUnavailable as err:
            return err.outcome
        base = self._config.base_url_for(self._apps[app])
        proxy, proxy_auth = self._proxies.get(base, (None, None))
        headers = {"Authorization": f"Bearer {token}"}
        if not call.form:
            headers["Content-Type"] = JSON_CONTENT  # a form sets its own, with the boundary
        url = self._url(base, call)
        sent: float | None = None  # when the request left (its latency is measured from there)
        try:
            while True:
                try:
                    async with self._slots:
                        if admit is not None:
                            await admit()
                        sent = time.perf_counter()
                        async with self._session.request(
                                call.method, url, headers=headers,
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
            self.drop_token(app, token, tenant)
        return outcome

    def _url(self, base: str, call: Call) -> URL:
        """The request URL, query included (what aiohttp would make of ``params``), built once per distinct one."""
        key: tuple[object, ...] = (base, call.path, *call.query.items())
        url = self._urls.get(key)
        if url is None:
            if len(self._urls) >= _MAX_URLS:
                self._urls.clear()
            # encoded=True: the path is sent exactly as relay.calls built it (quoted, and for api.call checked in
            # relay.intents); yarl would otherwise re-decode it and collapse "%2e%2e" segments
            url = URL(base + call.path, encoded=True)
            if call.query:
                url = url.extend_query(call.query)
            self._urls[key] = url
        return url

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


def _no_token(outcome: Outcome) -> Outcome:
    """A token endpoint's answer without a token, as the token outcome its callers get."""
    if outcome.verdict is Verdict.OK:  # code 0 but no token: treat as unreadable, permanent
        outcome = msgspec.structs.replace(outcome, verdict=Verdict.PERMANENT, msg="no token in answer")
    return token_error(outcome)


def _no_ticket(app: AppConfig) -> Outcome:
    """No valid app_ticket arrived after a resend: retried (Feishu pushes it to the event URL)."""
    return Outcome(verdict=Verdict.RETRY, http_status=None, code=None,
                   msg=f"app_ticket: none valid received for store app {app.name} after a resend "
                       "(is its event URL served by this relay?)")


def _permanent(msg: str) -> Outcome:
    return token_error(Outcome(verdict=Verdict.PERMANENT, http_status=None, code=None, msg=msg))


def _held(outcome: Outcome, remaining: float) -> Outcome:
    """The failed refresh's outcome answered during its hold: a RETRY waits at least until the hold ends."""
    if outcome.verdict is not Verdict.RETRY:
        return outcome
    return msgspec.structs.replace(outcome, retry_after=remaining)

