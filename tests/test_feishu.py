"""The Feishu client over real HTTP against the sandbox: tokens cached and refreshed once, answers classified."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from relay.calls import Call, build_call
from relay.feishu import FeishuClient
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
