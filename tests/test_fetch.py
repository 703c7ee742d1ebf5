"""The SSRF guard of uploads by url: which addresses may be fetched from (pure), and the resolver that enforces it.

No test here opens a connection: the resolver is given a fake inner resolver, and addresses are plain values.
"""

from __future__ import annotations

import ipaddress
import socket

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from relay.fetch import Fetcher, FetchRefused, GuardedResolver, refusal


@pytest.mark.parametrize(("address", "why"), [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"),
    ("10.0.0.5", "private"), ("172.16.3.4", "private"), ("192.168.1.1", "private"), ("fd00::1", "private"),
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),  # the cloud metadata endpoint
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"), ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("100.64.0.1", "not a public"), ("192.0.2.1", "private"), ("240.0.0.1", "reserved"),
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:10.1.1.1", "private"),  # IPv4-mapped: judged as IPv4
])
def test_non_public_addresses_are_refused(address: str, why: str) -> None:
    reason = refusal(ipaddress.ip_address(address))
    assert reason is not None and why in reason


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:2800:220:1:248:1893:25c8:1946",
                                     "::ffff:93.184.216.34"])
def test_public_addresses_may_be_fetched(address: str) -> None:
    assert refusal(ipaddress.ip_address(address)) is None


def test_the_allow_list_exempts_its_networks_only() -> None:
    allowed = [ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.1.2.0/24")]
    assert refusal(ipaddress.ip_address("127.0.0.1"), allowed) is None
    assert refusal(ipaddress.ip_address("10.1.2.200"), allowed) is None
    assert refusal(ipaddress.ip_address("127.0.0.2"), allowed) is not None
    assert refusal(ipaddress.ip_address("10.1.3.1"), allowed) is not None


class FakeDns(AbstractResolver):
    def __init__(self, *addresses: str) -> None:
        self.addresses = addresses
        self.asked: list[str] = []

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        self.asked.append(host)
        return [ResolveResult(hostname=host, host=a, port=port, family=socket.AF_INET, proto=0, flags=0)
                for a in self.addresses]

    async def close(self) -> None:
        pass


async def test_a_name_resolving_to_one_private_address_is_refused() -> None:
    guarded = GuardedResolver((), FakeDns("93.184.216.34", "10.0.0.7"))
    with pytest.raises(FetchRefused, match=r"files.example resolves to 10.0.0.7 is a private address"):
        await guarded.resolve("files.example", 443)


async def test_a_name_resolving_to_public_addresses_returns_exactly_those() -> None:
    dns = FakeDns("93.184.216.34")
    results = await GuardedResolver((), dns).resolve("files.example", 443)
    assert [r["host"] for r in results] == ["93.184.216.34"] and dns.asked == ["files.example"]


@pytest.mark.parametrize(("url", "reason"), [
    ("http://127.0.0.1:9/a.png", "loopback"), ("http://[::1]/a.png", "loopback"),
    ("http://169.254.169.254/latest/meta-data", "link-local"), ("ftp://example.com/a.png", "only http"),
])
async def test_ip_literals_and_schemes_are_refused_before_any_connection(url: str, reason: str) -> None:
    dns = FakeDns("93.184.216.34")
    fetcher = Fetcher([], timeout=5, resolver=dns)
    await fetcher.start()
    try:
        with pytest.raises(FetchRefused, match=reason):
            await fetcher.fetch(url, 100)
    finally:
        await fetcher.close()
    assert dns.asked == []


async def test_a_name_resolving_privately_is_refused_before_any_connection() -> None:
    fetcher = Fetcher([], timeout=5, resolver=FakeDns("192.168.0.10"))
    await fetcher.start()
    try:
        with pytest.raises(FetchRefused, match=r"192\.168\.0\.10 is a private address"):
            await fetcher.fetch("http://intranet.example/a.png", 100)
    finally:
        await fetcher.close()
