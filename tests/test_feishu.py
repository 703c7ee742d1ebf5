"""The Feishu client over real HTTP against the sandbox: tokens cached and refreshed once, answers classified."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from aiohttp import web

from relay.calls import Call, build_call
from relay.feishu import FAILED_TOKEN_HOLD, FeishuClient
from relay.intents import decode_intent
from relay.outcomes import Verdict
from relay.sandbox import Sandbox, SandboxOptions, SandboxStoreApp
from relay.tickets import TicketBook
from tests.relaykit import APP_ID, APP_SECRET, config_data, to_config


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    # the client alone does no limiting (the executor's limiter does): lift the sandbox's windows here
    box = Sandbox(SandboxOptions(apps={APP_ID: APP_SECRET}, enforce_limits=False))
    await box.start()
    yield box
    await box.stop()


@pytest.fixture
async def client(sandbox: Sandbox) -> AsyncIterator[FeishuClient]:
    feishu = FeishuClient(to_config(config_data("127.0.0.1:9092", "unused", sandbox.url)))
    await feishu.start()
    yield feishu
    await feishu.close()


def send_call(i: int) -> Call:
    return build_call(decode_intent(
        f'{{"kind":"message.send","id":"c-{i}","receive_id_type":"chat_id","receive_id":"oc_{i}",'
        f'"msg_type":"text","content":{{"text":"x"}}}}'.encode()))


async def test_token_is_fetched_once_and_reused(client: FeishuClient, sandbox: Sandbox) -> None:
    outcomes = await asyncio.gather(*(client.send("default", send_call(i)) for i in range(20)))
    assert all(o.verdict is Verdict.OK for o in outcomes)
    assert sandbox.token_requests == 1 and client.token_requests == 1


async def test_hundred_calls_on_an_expired_token_cause_one_refresh(client: FeishuClient, sandbox: Sandbox) -> None:
    await client.send("default", send_call(0))
    sandbox.expire_tokens()
    first = await asyncio.gather(*(client.send("default", send_call(i)) for i in range(100)))
    assert {o.verdict for o in first} == {Verdict.REFRESH}  # each dropped the same stale token
    again = await asyncio.gather(*(client.send("default", send_call(i)) for i in range(100)))
    assert {o.verdict for o in again} == {Verdict.OK}
    assert sandbox.token_requests == 2  # the first fetch and exactly one refresh


@contextlib.asynccontextmanager
async def wrong_secret_client(sandbox: Sandbox, **options: Any) -> AsyncIterator[FeishuClient]:
    """A started client whose one app's secret the sandbox refuses."""
    data = config_data("127.0.0.1:9092", "unused", sandbox.url)
    data["apps"][0]["app_secret"] = "wrong"
    feishu = FeishuClient(to_config(data), **options)
    await feishu.start()
    try:
        yield feishu
    finally:
        await feishu.close()


async def test_bad_credentials_are_a_permanent_outcome_naming_the_token(sandbox: Sandbox) -> None:
    async with wrong_secret_client(sandbox) as feishu:
        outcome = await feishu.send("default", send_call(1))
    assert outcome.verdict is Verdict.PERMANENT and outcome.code == 10014
    assert outcome.msg.startswith("tenant_access_token:") and "wrong" not in outcome.msg


async def test_unreachable_feishu_is_a_retry_outcome() -> None:
    feishu = FeishuClient(to_config(config_data("127.0.0.1:9092", "unused", "http://127.0.0.1:9")))
    await feishu.start()
    try:
        outcome = await feishu.send("default", send_call(1))
    finally:
        await feishu.close()
    assert outcome.verdict is Verdict.RETRY and outcome.msg.startswith("tenant_access_token:")


async def test_log_id_and_data_come_back(client: FeishuClient) -> None:
    outcome = await client.send("default", send_call(3))
    assert outcome.log_id and outcome.data["message_id"].startswith("om_")


async def test_proxy_from_the_environment_is_read_once_per_base_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://user:pw@proxy.internal:3128")
    monkeypatch.setenv("NO_PROXY", "open.larksuite.com")
    data = config_data("127.0.0.1:9092", "unused", "https://open.feishu.cn")
    data["apps"].append({"name": "lark", "app_id": "cli_2", "app_secret": "s",
                         "base_url": "https://open.larksuite.com"})
    feishu = FeishuClient(to_config(data))
    await feishu.start()
    try:
        proxy, auth = feishu._proxies["https://open.feishu.cn"]
        assert str(proxy) == "http://proxy.internal:3128" and auth is not None and auth.login == "user"
        assert feishu._proxies["https://open.larksuite.com"] == (None, None)  # NO_PROXY honoured
    finally:
        await feishu.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_a_wrong_secret_causes_one_token_request_per_hold(sandbox: Sandbox) -> None:
    clock = FakeClock()
    async with wrong_secret_client(sandbox, clock=clock) as feishu:
        first = await asyncio.gather(*(feishu.send("default", send_call(i)) for i in range(200)))
        assert {(o.verdict, o.code) for o in first} == {(Verdict.PERMANENT, 10014)}
        assert sandbox.token_requests == 1
        clock.now += FAILED_TOKEN_HOLD - 0.1  # still held: answered from memory
        held = await asyncio.gather(*(feishu.send("default", send_call(i)) for i in range(200)))
        assert {(o.verdict, o.code) for o in held} == {(Verdict.PERMANENT, 10014)}
        assert all(o.msg.startswith("tenant_access_token:") and not o.throttled for o in held)
        assert sandbox.token_requests == 1
        clock.now += 0.2  # the hold is over: one more request, then held again
        again = await asyncio.gather(*(feishu.send("default", send_call(i)) for i in range(200)))
        assert {o.code for o in again} == {10014}
        assert sandbox.token_requests == 2 and feishu.token_requests == 2


async def test_a_failed_token_refresh_ends_the_wait_for_a_token_problem(sandbox: Sandbox) -> None:
    async with wrong_secret_client(sandbox) as feishu:
        waiting = asyncio.create_task(feishu.token_problem_arises())
        await asyncio.sleep(0.05)
        assert not waiting.done()  # every token fine so far: the readiness retry sleeps
        await feishu.send("default", send_call(0))
        await asyncio.wait_for(waiting, 1.0)
        assert set(feishu.token_problems()) == {"default"}
        await asyncio.wait_for(feishu.token_problem_arises(), 1.0)  # at once while one is unavailable


class TokenServer:
    """A real HTTP token endpoint: 429 / 99991400 with a 3 s reset, or hanging while ``hang`` is set."""

    def __init__(self) -> None:
        self.url = ""
        self.requests = 0
        self.hang = asyncio.Event()
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()

    async def token(self, request: web.Request) -> web.Response:
        self.requests += 1
        self.arrived.set()
        if self.hang.is_set():
            await self.release.wait()  # until the fixture's teardown (aiohttp does not cancel on disconnect)
        return web.json_response({"code": 99991400, "msg": "request trigger frequency limit"}, status=429,
                                 headers={"x-ogw-ratelimit-reset": "3"})


@pytest.fixture
async def token_server() -> AsyncIterator[TokenServer]:
    server = TokenServer()
    app = web.Application()
    app.router.add_post("/open-apis/auth/v3/tenant_access_token/internal", server.token)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    server.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield server
    server.release.set()
    await runner.cleanup()


async def test_a_throttled_token_endpoint_waits_its_reset_but_never_slows_the_api(token_server: TokenServer) -> None:
    clock = FakeClock()
    feishu = FeishuClient(to_config(config_data("127.0.0.1:9092", "unused", token_server.url)), clock=clock)
    await feishu.start()
    try:
        outcomes = await asyncio.gather(*(feishu.send("default", send_call(i)) for i in range(50)))
        assert {(o.verdict, o.code, o.throttled, o.retry_after) for o in outcomes} == {
            (Verdict.RETRY, 99991400, False, 3.0)}  # the executor waits 3 s; no API bucket is penalized
        clock.now += 1.0
        held = await feishu.send("default", send_call(0))
        assert held.retry_after == pytest.approx(2.0) and not held.throttled  # the rest of the hold
        assert token_server.requests == 1
        clock.now += 2.5
        await feishu.send("default", send_call(0))
        assert token_server.requests == 2
    finally:
        await feishu.close()


async def test_close_cancels_a_refresh_in_flight(token_server: TokenServer) -> None:
    token_server.hang.set()
    feishu = FeishuClient(to_config(config_data("127.0.0.1:9092", "unused", token_server.url)))
    await feishu.start()
    sends = [asyncio.create_task(feishu.send("default", send_call(i))) for i in range(3)]
    await asyncio.wait_for(token_server.arrived.wait(), 5.0)
    await asyncio.wait_for(feishu.close(), 5.0)
    outcomes = await asyncio.wait_for(asyncio.gather(*sends), 5.0)
    assert {o.verdict for o in outcomes} == {Verdict.RETRY}
    assert not feishu._refresh_tasks and not feishu._refreshing


# --- store apps: app_ticket -> app_access_token -> tenant_access_token per tenant ---------------------------

STORE_ID, STORE_SECRET = "cli_store", "store-secret"


class TicketURL:
    """The event URL's part in the flow, without Kafka: a pushed app_ticket lands in a TicketBook."""

    def __init__(self) -> None:
        self.book = TicketBook()
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.book.apply(None, await request.read())
        return web.json_response({"msg": "success"})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/feishu/events/shop", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/feishu/events/shop"


@pytest.fixture
async def store() -> AsyncIterator[tuple[Sandbox, FeishuClient, TicketURL]]:
    events = TicketURL()
    await events.start()
    shop = SandboxStoreApp(app_secret=STORE_SECRET, ticket_url=events.url, tenants=frozenset({"t1", "t2"}))
    box = Sandbox(SandboxOptions(store_apps={STORE_ID: shop}, enforce_limits=False, ticket_interval=0))
    await box.start()
    data = config_data("127.0.0.1:9092", "unused", box.url)
    data["apps"] = [{"name": "shop", "type": "store", "app_id": STORE_ID, "app_secret": STORE_SECRET}]
    data["feishu"]["app_ticket_wait"] = 2.0
    feishu = FeishuClient(to_config(data), tickets=events.book)
    await feishu.start()
    yield box, feishu, events
    await feishu.close()
    await box.stop()
    assert events.runner is not None
    await events.runner.cleanup()


async def test_a_store_app_without_a_ticket_asks_for_a_resend_and_gets_a_token_per_tenant(
        store: tuple[Sandbox, FeishuClient, TicketURL]) -> None:
    box, client, _ = store
    outcomes = await asyncio.gather(*(client.send("shop", send_call(i), tenant=f"t{1 + i % 2}") for i in range(40)))
    assert {o.verdict for o in outcomes} == {Verdict.OK}
    assert client.resends == 1 and box.store.resends == 1  # one resend however many calls waited for it
    assert len(box.calls_for("auth.app_access_token")) == 1  # one app token for every tenant
    tenant_calls = box.calls_for("auth.tenant_access_token")
    assert sorted(c.tenant_key for c in tenant_calls) == ["t1", "t2"]  # one per tenant
    sent = box.calls_for("message.send")
    assert {c.tenant_key for c in sent} == {"t1", "t2"} and all(c.app_id == STORE_ID for c in sent)


async def test_a_tenant_token_expiring_is_refreshed_once_for_that_tenant_only(
        store: tuple[Sandbox, FeishuClient, TicketURL]) -> None:
    box, client, _ = store
    for tenant in ("t1", "t2"):
        assert (await client.send("shop", send_call(0), tenant=tenant)).verdict is Verdict.OK
    box.expire_tenant_token(STORE_ID, "t1")
    first = await asyncio.gather(*(client.send("shop", send_call(i), tenant="t1") for i in range(30)))
    assert {o.verdict for o in first} == {Verdict.REFRESH}
    again = await asyncio.gather(*(client.send("shop", send_call(i), tenant=t)
                                   for i in range(30) for t in ("t1", "t2")))
    assert {o.verdict for o in again} == {Verdict.OK}
    assert [c.tenant_key for c in box.calls_for("auth.tenant_access_token")] == ["t1", "t2", "t1"]
    assert len(box.calls_for("auth.app_access_token")) == 1


async def test_a_ticket_feishu_calls_invalid_is_dropped_resent_and_the_new_one_used(
        store: tuple[Sandbox, FeishuClient, TicketURL]) -> None:
    box, client, events = store
    await box.push_ticket(STORE_ID)
    old = events.book.get(STORE_ID)
    assert old is not None
    box.invalidate_tickets(STORE_ID)  # e.g. expired, or the app was reset: 10012
    assert (await client.send("shop", send_call(0), tenant="t1")).verdict is Verdict.OK
    codes = [c.code for c in box.calls_for("auth.app_access_token")]
    assert codes == [10012, 0] and client.resends == 1
    assert events.book.get(STORE_ID) not in (None, old)


async def test_a_tenant_that_has_not_installed_the_app_is_a_permanent_token_outcome(
        store: tuple[Sandbox, FeishuClient, TicketURL]) -> None:
    _, client, _ = store
    outcome = await client.send("shop", send_call(0), tenant="stranger")
    assert outcome.verdict is Verdict.PERMANENT and outcome.token_unavailable
    assert (await client.send("shop", send_call(0), tenant="t1")).verdict is Verdict.OK  # others unaffected


async def test_no_ticket_arriving_after_a_resend_is_a_retry_naming_the_app_ticket() -> None:
    shop = SandboxStoreApp(app_secret=STORE_SECRET, ticket_url=None)  # Feishu cannot reach the event URL
    box = Sandbox(SandboxOptions(store_apps={STORE_ID: shop}, enforce_limits=False, ticket_interval=0))
    await box.start()
    data = config_data("127.0.0.1:9092", "unused", box.url)
    data["apps"] = [{"name": "shop", "type": "store", "app_id": STORE_ID, "app_secret": STORE_SECRET}]
    data["feishu"]["app_ticket_wait"] = 0.2
    client = FeishuClient(to_config(data))
    await client.start()
    try:
        outcome = await client.send("shop", send_call(0), tenant="t1")
        wrong = FeishuClient(to_config({**data, "apps": [{**data["apps"][0], "app_secret": "wrong"}]}))
        await wrong.start()
        try:
            refused = await wrong.send("shop", send_call(0), tenant="t1")
        finally:
            await wrong.close()
    finally:
        await client.close()
        await box.stop()
    assert outcome.token_unavailable and outcome.verdict is Verdict.RETRY and "app_ticket" in outcome.msg
    assert box.store.resends == 1
    assert refused.token_unavailable and refused.verdict is Verdict.PERMANENT  # resend refused: 10014


async def test_tenant_tokens_past_the_cap_forget_the_least_recently_used(
        store: tuple[Sandbox, FeishuClient, TicketURL]) -> None:
    box, client, _ = store
    box.store.apps[STORE_ID] = msgspec.structs.replace(box.store.apps[STORE_ID], tenants=frozenset())
    client._config = msgspec.structs.replace(  # a cap of 3 tenant tokens
        client._config, feishu=msgspec.structs.replace(client._config.feishu, max_tenant_tokens=3))
    for i in range(6):
        assert (await client.send("shop", send_call(i), tenant=f"x{i}")).verdict is Verdict.OK
    assert [tenant for _, tenant in client._tokens] == ["x3", "x4", "x5"]


async def test_an_app_token_feishu_refuses_is_fetched_again_once(
        store: tuple[Sandbox, FeishuClient, TicketURL]) -> None:
    box, client, _ = store
    assert (await client.send("shop", send_call(0), tenant="t1")).verdict is Verdict.OK
    box.store.app_tokens.clear()  # Feishu no longer knows the cached app_access_token
    assert (await client.send("shop", send_call(1), tenant="t2")).verdict is Verdict.OK
    assert [c.code for c in box.calls_for("auth.tenant_access_token")] == [0, 99991664, 0]
    assert [c.code for c in box.calls_for("auth.app_access_token")] == [0, 0]


async def test_calls_of_one_path_with_other_queries_each_send_their_own(client: FeishuClient) -> None:
    """Request URLs are built once per path and query (FeishuClient._url): the query is part of what is kept."""
    def to(receive_id_type: str, receive_id: str) -> Call:
        return build_call(decode_intent(msgspec.json.encode({
            "kind": "message.send", "id": f"q-{receive_id}", "receive_id_type": receive_id_type,
            "receive_id": receive_id, "msg_type": "text", "content": {"text": "x"}})))

    for _ in range(2):  # the second round from the kept URLs
        chat = await client.send("default", to("chat_id", "oc_q1"))
        person = await client.send("default", to("open_id", "ou_q1"))
        assert chat.verdict is Verdict.OK and person.verdict is Verdict.OK
        assert chat.data["chat_id"] == "oc_q1"
        assert person.data["chat_id"] != "oc_q1"  # sent as an open_id: the person's p2p chat
    assert len(client._urls) == 2
