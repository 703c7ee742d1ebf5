"""The Feishu client over real HTTP against the sandbox: tokens cached and refreshed once, answers classified."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from relay.calls import Call, build_call
from relay.feishu import FAILED_TOKEN_HOLD, FeishuClient
from relay.intents import decode_intent
from relay.outcomes import Verdict
from relay.sandbox import Sandbox, SandboxOptions
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


async def test_bad_credentials_are_a_permanent_outcome_naming_the_token(sandbox: Sandbox) -> None:
    data = config_data("127.0.0.1:9092", "unused", sandbox.url)
    data["apps"][0]["app_secret"] = "wrong"
    feishu = FeishuClient(to_config(data))
    await feishu.start()
    try:
        outcome = await feishu.send("default", send_call(1))
    finally:
        await feishu.close()
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
    data = config_data("127.0.0.1:9092", "unused", sandbox.url)
    data["apps"][0]["app_secret"] = "wrong"
    clock = FakeClock()
    feishu = FeishuClient(to_config(data), clock=clock)
    await feishu.start()
    try:
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
    finally:
        await feishu.close()


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
