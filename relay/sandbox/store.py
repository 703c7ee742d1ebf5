"""The sandbox's store apps (商店应用): app_tickets pushed to the app's event URL, app and tenant tokens.

Feishu's flow (docs/feishu-rules.md §1.1; auth-v3 pages ``app_ticket_resend``, ``app_access_token``,
``tenant_access_token/create``; event page ``app_ticket-events``), played as strictly as the custom-app token:

- every ``ticket_interval`` (1 h; 0 = only on demand) and at once after ``POST
  /open-apis/auth/v3/app_ticket/resend`` (``{app_id, app_secret}``; wrong credentials 10014), a new ticket is
  pushed to the app's ``ticket_url`` as a v1 event ``{"ts", "uuid", "token", "type": "event_callback", "event":
  {"app_id", "app_ticket", "type": "app_ticket"}}`` (unencrypted; ``token`` = the app's verification token);
  a push not answered 200 is tried again a few times, as Feishu redelivers;
- ``POST /open-apis/auth/v3/app_access_token`` (``{app_id, app_secret, app_ticket}``): a ticket not issued to
  that app, or past ``ticket_ttl``, is 10012; wrong credentials 10014; else an app token of ``token_ttl``, the
  same one while more than ``token_refresh_window`` is left (as for tenant tokens);
- ``POST /open-apis/auth/v3/tenant_access_token`` (``{app_access_token, tenant_key}``): an unknown or expired app
  token is 99991664; a tenant that has not installed the app (``tenants``, empty = any) 10003; else a tenant token
  bound to (app, tenant), whose calls count in that tenant's own app-wide windows;
- a store app's id at the custom-app ``/tenant_access_token/internal`` is refused (10014): it has no such token.

The pure part (tickets, tokens, their expiry) is :class:`StoreAuth`; the server routes the three endpoints to it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any, Final

import aiohttp
import msgspec

log = logging.getLogger(__name__)

TICKET_INVALID: Final = 10012
APP_TOKEN_INVALID: Final = 99991664
INVALID_PARAM: Final = 10003
WRONG_SECRET: Final = 10014


class SandboxStoreApp(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One store app: its secret, where its tickets are pushed, and the tenants that installed it."""

    app_secret: str
    ticket_url: str | None = None  # the relay's event URL for this app (``.../feishu/events/<name>``)
    verification_token: str = ""  # sent as the push's ``token``
    tenants: frozenset[str] = frozenset()  # tenant_keys that installed the app; empty = any


class Issued(msgspec.Struct):
    """A ticket or token the sandbox issued: to which app (and tenant), until when (sandbox clock)."""

    value: str
    app_id: str
    expires_at: float
    tenant_key: str | None = None


class Refusal(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class StoreAuth:
    """Tickets and app tokens of the store apps; tenant tokens are minted through ``mint`` (the server's)."""

    def __init__(self, apps: dict[str, SandboxStoreApp], *, token_ttl: float, refresh_window: float,
                 ticket_ttl: float, clock: Callable[[], float]) -> None:
        """Durations are already scaled (sandbox seconds)."""
        self.apps = apps
        self._token_ttl = token_ttl
        self._refresh_window = refresh_window
        self._ticket_ttl = ticket_ttl
        self._clock = clock
        self.tickets: dict[str, Issued] = {}
        self.app_tokens: dict[str, Issued] = {}
        self._current_app_token: dict[str, str] = {}
        self.resends = 0
        self.pushes: list[tuple[str, int]] = []  # (app_id, HTTP status of the push; 0: no answer)

    def check(self, app_id: str, secret: str) -> SandboxStoreApp:
        app = self.apps.get(app_id)
        if app is None or app.app_secret != secret:
            raise Refusal(WRONG_SECRET)
        return app

    def new_ticket(self, app_id: str) -> Issued:
        now = self._clock()
        ticket = Issued(value=f"ticket-{secrets.token_hex(12)}", app_id=app_id, expires_at=now + self._ticket_ttl)
        self.tickets[ticket.value] = ticket
        for value in [v for v, t in self.tickets.items() if t.expires_at <= now]:
            del self.tickets[value]
        return ticket

    def invalidate_tickets(self, app_id: str) -> None:
        """Every ticket of ``app_id`` is refused from now on (10012) until a new one is pushed."""
        for value in [v for v, t in self.tickets.items() if t.app_id == app_id]:
            del self.tickets[value]

    def app_token(self, app_id: str, secret: str, ticket: str) -> Issued:
        self.check(app_id, secret)
        now = self._clock()
        issued = self.tickets.get(ticket)
        if issued is None or issued.app_id != app_id or issued.expires_at <= now:
            raise Refusal(TICKET_INVALID)
        current = self.app_tokens.get(self._current_app_token.get(app_id, ""))
        if current is not None and current.expires_at - now >= self._refresh_window:
            return current
        token = Issued(value=f"a-{secrets.token_hex(16)}", app_id=app_id, expires_at=now + self._token_ttl)
        self.app_tokens[token.value] = token
        self._current_app_token[app_id] = token.value
        for value in [v for v, t in self.app_tokens.items() if t.expires_at <= now]:
            del self.app_tokens[value]
        return token

    def tenant_of(self, app_token: str, tenant_key: str) -> str:
        """The app_id a tenant token is to be minted for; refuses a bad app token or an uninstalled tenant."""
        issued = self.app_tokens.get(app_token)
        if issued is None or issued.expires_at <= self._clock():
            raise Refusal(APP_TOKEN_INVALID)
        tenants = self.apps[issued.app_id].tenants
        if not tenant_key or (tenants and tenant_key not in tenants):
            raise Refusal(INVALID_PARAM)
        return issued.app_id


def ticket_event(app_id: str, ticket: str, verification_token: str) -> dict[str, Any]:
    """The v1 app_ticket event Feishu pushes (event page ``app_ticket-events``)."""
    return {"ts": f"{time.time():.6f}", "uuid": secrets.token_hex(16), "token": verification_token,
            "type": "event_callback", "event": {"app_id": app_id, "app_ticket": ticket, "type": "app_ticket"}}


async def push(session: aiohttp.ClientSession, url: str, event: dict[str, Any], *, attempts: int = 5,
               pause: float = 0.2) -> int:
    """POST ``event`` to ``url`` until it is answered 200 (``attempts`` tries); the last HTTP status, 0 for none."""
    status = 0
    for attempt in range(attempts):
        try:
            async with session.post(url, data=msgspec.json.encode(event),
                                    headers={"Content-Type": "application/json"}) as resp:
                status = resp.status
                await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as err:
            log.debug("sandbox: app_ticket push to %s failed: %s", url, err)
            status = 0
        if status == 200:
            return status
        if attempt + 1 < attempts:
            await asyncio.sleep(pause)
    return status
