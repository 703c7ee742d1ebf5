"""Fetching an upload's bytes from a URL without letting the URL reach inside (an SSRF guard).

An ``image.upload`` / ``file.upload`` with ``url`` makes the relay download the file itself (Feishu has no "send
by URL"). The URL comes from a producer, so it must not be a way into the relay's own network:

* **Only public addresses.** Every address the host resolves to must be a global unicast address
  (:func:`refusal`: not loopback, private, link-local, shared (100.64/10), multicast, reserved, unspecified,
  documentation or any other special range; an IPv4-mapped IPv6 address is judged as its IPv4 address), unless it
  lies in ``outbound.fetch_allowed_networks`` (for a file server the operator trusts, and the tests' loopback
  one). A host that resolves to one bad address is refused outright, before any connection.
* **The checked address is the one connected to.** The host is resolved once, by :class:`GuardedResolver` inside
  the connector, and the connection uses exactly the addresses it checked, so a DNS answer that changes between
  check and connect (rebinding) cannot slip in. An IP literal in the URL (which aiohttp connects to without
  resolving) is checked before the request. TLS still verifies the certificate for the URL's host name.
* **Redirects are followed by hand** (at most :data:`MAX_REDIRECTS`), each new URL checked the same way.
* **Bounded.** ``outbound.fetch_timeout`` for the whole download; at most ``limit`` bytes (Feishu's 10 MB for an
  image, 30 MB for a file) are read, a longer body is refused without reading on. No proxy from the environment,
  no cookies.

Refusals are :class:`FetchRefused` (the URL or what it holds is not acceptable, e.g. larger than Feishu takes:
the intent is ``rejected``); failures to download are :class:`FetchFailed` (``failed``, dead letter ``fetch``),
each one line without the body.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence
from typing import Final
from urllib.parse import urljoin

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from yarl import URL

__all__ = ["MAX_REDIRECTS", "FetchFailed", "FetchRefused", "Fetcher", "GuardedResolver", "refusal"]

MAX_REDIRECTS: Final = 3
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class FetchRefused(Exception):
    """The URL may not be fetched (a non-public address, a scheme, too many redirects): the intent is refused."""


class FetchFailed(Exception):
    """The download did not succeed (an HTTP error, a timeout, too large, the connection failed)."""


def refusal(address: Address, allowed: Sequence[Network] = ()) -> str | None:
    """Why ``address`` may not be fetched from, or None when it may (module doc). Pure, for any address."""
    if any(address in network for network in allowed):
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return refusal(address.ipv4_mapped, allowed)
    for name in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):
        if getattr(address, f"is_{name}"):
            return f"{address} is a {name.replace('_', '-')} address"
    if not address.is_global:
        return f"{address} is not a public address"
    return None


class GuardedResolver(AbstractResolver):
    """Resolves with ``inner`` and returns the addresses only if every one of them is allowed (module doc)."""

    def __init__(self, allowed: Sequence[Network], inner: AbstractResolver | None = None) -> None:
        self._allowed = tuple(allowed)
        self._inner = inner

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        if self._inner is None:
            self._inner = ThreadedResolver()
        results = await self._inner.resolve(host, port, family)
        for result in results:
            why = refusal(ipaddress.ip_address(result["host"]), self._allowed)
            if why is not None:
                raise FetchRefused(f"url: {host} resolves to {why}")
        return results

    async def close(self) -> None:
        if self._inner is not None:
            await self._inner.close()


def _checked(url: str, allowed: Sequence[Network]) -> URL:
    parsed = URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise FetchRefused("url: only http(s) URLs with a host can be fetched")
    try:
        literal = ipaddress.ip_address(parsed.host)
    except ValueError:
        return parsed  # a name: the resolver checks what it resolves to
    why = refusal(literal, allowed)
    if why is not None:
        raise FetchRefused(f"url: {why}")
    return parsed


class Fetcher:
    """Downloads with the guard of the module doc. ``start()`` before use, ``close()`` after."""

    def __init__(self, allowed: Sequence[str], timeout: float, resolver: AbstractResolver | None = None) -> None:
        """``allowed``: networks (CIDR) exempt from the public-address rule; ``resolver``: for tests."""
        self._allowed = tuple(ipaddress.ip_network(network, strict=False) for network in allowed)
        self._timeout = timeout
        self._resolver = resolver
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(resolver=GuardedResolver(self._allowed, self._resolver),
                                         use_dns_cache=False)
        self._session = aiohttp.ClientSession(connector=connector, trust_env=False,
                                              cookie_jar=aiohttp.DummyCookieJar(),
                                              timeout=aiohttp.ClientTimeout(total=self._timeout))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def fetch(self, url: str, limit: int) -> bytes:
        """The body at ``url``, at most ``limit`` bytes; raises FetchRefused or FetchFailed."""
        assert self._session is not None, "Fetcher.start() was not awaited"
        try:
            async with asyncio.timeout(self._timeout):
                for _ in range(MAX_REDIRECTS + 1):
                    target = _checked(url, self._allowed)
                    async with self._session.get(target, allow_redirects=False) as resp:
                        if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                            url = urljoin(str(target), resp.headers["Location"])
                            continue
                        if resp.status != 200:
                            raise FetchFailed(f"url: HTTP {resp.status} from {target.host}")
                        if resp.content_length is not None and resp.content_length > limit:
                            raise FetchRefused(f"url: {resp.content_length} bytes is more than Feishu takes "
                                               f"({limit})")
                        body = await resp.content.read(limit + 1)
                        while len(body) <= limit and not resp.content.at_eof():
                            body += await resp.content.read(limit + 1 - len(body))
                        if len(body) > limit:
                            raise FetchRefused(f"url: the body is more than Feishu takes ({limit} bytes)")
                        return body
                raise FetchRefused(f"url: more than {MAX_REDIRECTS} redirects")
        except TimeoutError:
            raise FetchFailed(f"url: no complete answer within {self._timeout:g}s") from None
        except aiohttp.ClientError as err:
            raise FetchFailed(f"url: {type(err).__name__}") from None
