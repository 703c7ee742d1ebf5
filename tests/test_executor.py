"""The executor's branching, with a fake sender, a real limiter and an injected clock (no sleeping)."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web

from relay.backoff import RetryPolicy
from relay.buckets import Window
from relay.calls import Call, build_call
from relay.executor import Executor
from relay.feishu import FeishuClient
from relay.intents import decode_intent
from relay.limits import Limiter
from relay.outcomes import Outcome, Verdict, classify, network_error
from relay.sandbox import Sandbox, SandboxOptions
from tests.relaykit import APP_ID, APP_SECRET, config_data, to_config

CALL = Call(method="POST", path="/open-apis/im/v1/messages", query={}, body=b"{}", api="im.message.create",
            api_windows=(Window(50, 1), Window(1000, 60)), target="chat:oc_1",
            target_windows=(Window(5, 1),), uuid_protected=True, repeatable=True)


def outcome(verdict: Verdict, code: int | None = 0, *, throttled: bool = False,
            retry_after: float | None = None) -> Outcome:
    return Outcome(verdict=verdict, http_status=200, code=code, msg="m", data=None, log_id=None,
                   retry_after=retry_after, throttled=throttled)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += max(seconds, 0.0)


class Script:
    """A sender answering from a script, recording when each attempt was made."""

    def __init__(self, answers: Sequence[Outcome], clock: Clock) -> None:
        self.answers = list(answers)
        self.clock = clock
        self.times: list[float] = []

    async def send(self, app: str, call: Call, admit: Callable[[], Awaitable[None]] | None = None, *,
                   tenant: str | None = None) -> Outcome:
        if admit is not None:
            await admit()
        self.times.append(self.clock.now)
        return self.answers.pop(0)


def executor(script: Script, clock: Clock, *, attempts: int = 5, seconds: float = 60.0) -> tuple[Executor, Limiter]:
    limiter = Limiter(jitter=0.0, utilization=0.975, clock=clock, sleep=clock.sleep)
    policy = RetryPolicy(max_attempts=attempts, max_seconds=seconds, base=0.5, cap=8.0)
    return Executor(script, limiter, policy, clock=clock, wall=clock, sleep=clock.sleep,
                    rng=random.Random(1)), limiter


@pytest.mark.parametrize("verdict", [Verdict.OK, Verdict.PARTIAL, Verdict.PERMANENT])
async def test_final_answers_end_after_one_attempt(verdict: Verdict) -> None:
    clock = Clock()
    script = Script([outcome(verdict, 230001 if verdict is Verdict.PERMANENT else 0)], clock)
    done = await executor(script, clock)[0].execute("default", CALL)
    assert done.attempts == 1 and done.outcome is not None and done.outcome.verdict is verdict
    assert not done.exhausted and not done.expired


async def test_refresh_retries_once_at_once_then_gives_up() -> None:
    clock = Clock()
    untargeted = msgspec.structs.replace(CALL, target=None, target_windows=())  # no 5/s spacing in the way
    script = Script([outcome(Verdict.REFRESH, 99991663), outcome(Verdict.OK)], clock)
    done = await executor(script, clock)[0].execute("default", untargeted)
    assert (done.attempts, clock.slept) == (2, [])
    script = Script([outcome(Verdict.REFRESH, 99991663)] * 2, clock)
    done = await executor(script, clock)[0].execute("default", CALL)
    assert done.attempts == 2 and done.outcome is not None and done.outcome.code == 99991663


async def test_retries_back_off_until_attempts_run_out() -> None:
    clock = Clock()
    script = Script([outcome(Verdict.RETRY, 1500)] * 3, clock)
    done = await executor(script, clock, attempts=3)[0].execute("default", CALL)
    assert done.attempts == 3 and done.exhausted
    gaps = [b - a for a, b in zip(script.times, script.times[1:], strict=False)]
    assert all(gap >= 0 for gap in gaps) and len(gaps) == 2


async def test_retries_stop_when_total_time_would_pass() -> None:
    clock = Clock()
    script = Script([outcome(Verdict.RETRY, 1500, retry_after=30.0)] * 10, clock)
    done = await executor(script, clock, attempts=10, seconds=50.0)[0].execute("default", CALL)
    assert done.exhausted and done.attempts == 2  # a third attempt would land past 50 s


async def test_rate_limit_waits_the_reset_and_penalizes_the_app_bucket() -> None:
    clock = Clock()
    script = Script([outcome(Verdict.RETRY, 99991400, throttled=True, retry_after=3.0), outcome(Verdict.OK)], clock)
    ex, limiter = executor(script, clock)
    done = await ex.execute("default", CALL)
    assert done.attempts == 2
    assert script.times[1] - script.times[0] >= 3.0
    assert limiter.stats().throttles == 1


async def test_per_target_limit_penalizes_only_the_target_bucket() -> None:
    clock = Clock()
    script = Script([outcome(Verdict.RETRY, 230020, throttled=True), outcome(Verdict.OK)], clock)
    ex, limiter = executor(script, clock)
    await ex.execute("default", CALL)
    target = limiter.bucket(("target", "default", "chat:oc_1"))  # shared by every API reaching the chat
    app = limiter.bucket(("app", "default", CALL.api))
    assert target is not None and app is not None
    assert target.rate < app.rate  # the target slowed; the app bucket kept its rate


async def test_expiry_is_checked_before_every_attempt() -> None:
    clock = Clock()
    script = Script([outcome(Verdict.RETRY, 1500)] * 5, clock)
    ex, _ = executor(script, clock)
    done = await ex.execute("default", CALL, expires_at=clock.now - 1)
    assert done.expired and done.attempts == 0 and not script.times
    done = await ex.execute("default", CALL, expires_at=clock.now + 0.01)
    assert done.expired and done.attempts == 1  # the retry would have started after expires_at


async def test_min_retry_delay_and_before_attempt_hook() -> None:
    clock = Clock()
    script = Script([outcome(Verdict.RETRY, 1500), outcome(Verdict.OK)], clock)
    hooked: list[float] = []

    async def hook() -> None:
        hooked.append(clock.now)

    done = await executor(script, clock)[0].execute("default", CALL, min_retry_delay=5.0, before_attempt=hook)
    assert done.attempts == 2 and hooked == script.times
    assert script.times[1] - script.times[0] >= 5.0


async def test_admissible_rejects_what_this_replicas_share_cannot_send() -> None:
    clock = Clock()
    limiter = Limiter(jitter=0.15, utilization=0.975, share=0.25, clock=clock, sleep=clock.sleep)
    ex = Executor(Script([], clock), limiter, RetryPolicy(max_attempts=1, max_seconds=1, base=0.5, cap=1.0),
                  clock=clock, wall=clock, sleep=clock.sleep)
    assert ex.admissible(CALL) is None  # 50/s * 0.25, and the chat's 5/s is never shared
    tiny = msgspec.structs.replace(CALL, api="api:GET /open-apis/x", api_windows=(Window(3, 1),), target=None,
                                   target_windows=())
    reason = ex.admissible(tiny)
    assert reason is not None and reason.startswith("api:GET /open-apis/x: quota_share 0.25 of 3 calls per 1 s")
    with pytest.raises(ValueError):  # what execute would do with it: the engine must ask first
        await ex.execute("default", tiny)


async def test_the_gate_waits_then_checks_last_right_before_the_request_and_can_stop_it() -> None:
    clock = Clock()
    script = Script([outcome(Verdict.OK)], clock)
    order: list[str] = []

    class Stopped(Exception):
        pass

    class Gate:
        open = True
        not_now = 0  # this many checks answer "not at this instant"

        async def wait(self) -> None:
            order.append("wait")
            if not self.open:
                raise Stopped

        def check(self) -> bool:
            order.append("check")
            if not self.open:
                raise Stopped
            if self.not_now:
                self.not_now -= 1
                return False
            return True

    async def before_send() -> None:
        order.append("before_send")

    gate = Gate()
    limiter = Limiter(jitter=0.0, utilization=0.975, clock=clock, sleep=clock.sleep)
    policy = RetryPolicy(max_attempts=3, max_seconds=60.0, base=0.5, cap=8.0)
    ex = Executor(script, limiter, policy, clock=clock, wall=clock, sleep=clock.sleep, rng=random.Random(1),
                  gate=gate)
    async def before_write() -> None:
        order.append("before_write")

    done = await ex.execute("default", CALL, before_write=before_write, before_send=before_send)
    assert done.attempts == 1 and order == ["wait", "before_write", "before_send", "check"]
    assert len(script.times) == 1
    # "not now" at the instant of writing: wait again (the send-time guard and the hook again), then send, once;
    # the journal's before_write runs once per attempt, not per gate round
    order.clear()
    gate.not_now = 1
    script.answers.append(outcome(Verdict.OK))
    done = await ex.execute("default", CALL, before_write=before_write, before_send=before_send)
    assert done.attempts == 1
    assert order == ["wait", "before_write", "before_send", "check", "wait", "before_send", "check"]
    assert len(script.times) == 2
    gate.open = False
    with pytest.raises(Stopped):
        await ex.execute("default", CALL, before_send=before_send)
    assert len(script.times) == 2, "a closed gate let a request out"


# ---- answers lost after the request was written --------------------------------------------------------------


def built(intent: dict[str, Any]) -> Call:
    return build_call(decode_intent(msgspec.json.encode(intent)))


REACTION = {"kind": "reaction.add", "id": "r-1", "message_id": "om_1", "emoji_type": "THUMBSUP"}
URGENT = {"kind": "message.urgent", "id": "u-1", "message_id": "om_1", "channel": "sms", "user_id_list": ["ou_1"]}
BATCH = {"kind": "message.batch_send", "id": "b-1", "msg_type": "text", "content": {"text": "x"},
         "open_ids": ["ou_1"]}
PATCH = {"kind": "card.patch", "id": "p-1", "message_id": "om_1", "content": {"elements": []}}
SEND = {"kind": "message.send", "id": "s-1", "receive_id_type": "chat_id", "receive_id": "oc_1", "msg_type": "text",
        "content": {"text": "hi"}}

# what the client answers when the request may have been performed (relay.outcomes)
MAYBE_PERFORMED = [
    network_error(aiohttp.ServerDisconnectedError()),
    network_error(aiohttp.SocketTimeoutError("Timeout on reading data from socket")),
    network_error(TimeoutError()),
    classify(502, {}, b"bad gateway"),
    classify(500, {}, b'{"code":1500,"msg":"internal error"}'),
]


@pytest.mark.parametrize("intent", [REACTION, URGENT, BATCH], ids=lambda i: i["kind"])
@pytest.mark.parametrize("lost", MAYBE_PERFORMED, ids=lambda o: o.msg[:24])
async def test_a_call_not_safe_to_repeat_is_not_retried_after_a_maybe_performed_failure(
        intent: dict[str, Any], lost: Outcome) -> None:
    clock = Clock()
    script = Script([lost, outcome(Verdict.OK)], clock)
    done = await executor(script, clock)[0].execute("default", built(intent))
    assert len(script.times) == 1, "the call was sent again after its answer was lost"
    assert done.attempts == 1 and done.unknown and not done.exhausted
    assert done.outcome is lost


@pytest.mark.parametrize("intent", [SEND, PATCH], ids=lambda i: i["kind"])
async def test_a_repeatable_call_is_retried_after_a_maybe_performed_failure(intent: dict[str, Any]) -> None:
    clock = Clock()
    script = Script([network_error(aiohttp.ServerDisconnectedError()), outcome(Verdict.OK)], clock)
    done = await executor(script, clock)[0].execute("default", built(intent))
    assert done.attempts == 2 and not done.unknown
    assert done.outcome is not None and done.outcome.verdict is Verdict.OK


@pytest.mark.parametrize("first", [
    network_error(ConnectionRefusedError(111, "Connection refused")),  # not an aiohttp connector error: maybe
    classify(429, {"x-ogw-ratelimit-reset": "1"}, b'{"code":99991400,"msg":"limit"}'),
    classify(400, {}, b'{"code":230020,"msg":"frequency limit"}'),
], ids=["reset-by-os", "99991400", "230020"])
async def test_a_call_not_safe_to_repeat_is_retried_when_it_was_not_performed(first: Outcome) -> None:
    clock = Clock()
    script = Script([first, outcome(Verdict.OK)], clock)
    done = await executor(script, clock)[0].execute("default", built(REACTION))
    if first.maybe_performed:  # a bare OSError names no phase: conservatively maybe performed
        assert (done.attempts, done.unknown) == (1, True)
    else:
        assert (done.attempts, done.unknown) == (2, False)


async def test_a_connect_error_is_retried_for_every_call() -> None:
    clock = Clock()
    refused = network_error(aiohttp.ConnectionTimeoutError("Connection timeout to host"))
    script = Script([refused, refused, outcome(Verdict.OK)], clock)
    done = await executor(script, clock)[0].execute("default", built(URGENT))
    assert done.attempts == 3 and not done.unknown


# ---- token trouble is not an attempt ----------------------------------------------------------------------------


class FlakyFeishu:
    """A real HTTP Feishu: the token endpoint answers a gateway 503 ``down`` times, then tokens; the API answers ok."""

    def __init__(self, down: int) -> None:
        self.down = down
        self.token_requests = 0
        self.api_requests = 0
        self.url = ""

    async def token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        if self.token_requests <= self.down:
            return web.Response(status=503, text="503 gateway error")
        return web.json_response({"code": 0, "msg": "ok", "tenant_access_token": "t-1", "expire": 7200})

    async def api(self, request: web.Request) -> web.Response:
        self.api_requests += 1
        return web.json_response({"code": 0, "msg": "success", "data": {}})


@pytest.fixture
async def flaky() -> AsyncIterator[Callable[[int], Awaitable[FlakyFeishu]]]:
    runners: list[web.AppRunner] = []

    async def start(down: int) -> FlakyFeishu:
        server = FlakyFeishu(down)
        app = web.Application()
        app.router.add_post("/open-apis/auth/v3/tenant_access_token/internal", server.token)
        app.router.add_route("*", "/open-apis/{tail:.*}", server.api)
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        server.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        return server

    yield start
    for runner in runners:
        await runner.cleanup()


async def test_a_token_outage_does_not_use_up_the_attempts(
        flaky: Callable[[int], Awaitable[FlakyFeishu]]) -> None:
    server = await flaky(6)  # six failed refreshes: 6 holds of FAILED_TOKEN_HOLD, more than max_attempts
    clock = Clock()
    client = FeishuClient(to_config(config_data("127.0.0.1:9092", "unused", server.url)), clock=clock)
    await client.start()
    try:
        ex, _ = executor(client, clock, attempts=3, seconds=60.0)  # type: ignore[arg-type]
        done = await ex.execute("default", built(REACTION))
    finally:
        await client.close()
    assert done.outcome is not None and done.outcome.verdict is Verdict.OK, done
    assert done.attempts == 1 and server.api_requests == 1 and server.token_requests == 7


async def test_a_token_outage_is_still_bounded_by_the_total_time(
        flaky: Callable[[int], Awaitable[FlakyFeishu]]) -> None:
    server = await flaky(10_000)
    clock = Clock()
    client = FeishuClient(to_config(config_data("127.0.0.1:9092", "unused", server.url)), clock=clock)
    await client.start()
    try:
        ex, _ = executor(client, clock, attempts=3, seconds=30.0)  # type: ignore[arg-type]
        done = await ex.execute("default", built(REACTION))
    finally:
        await client.close()
    assert done.exhausted and done.attempts == 0 and server.api_requests == 0
    assert done.outcome is not None and done.outcome.msg.startswith("tenant_access_token:")
    assert clock.now - 1000.0 <= 30.0 and server.token_requests >= 10  # ~2 s holds within 30 s


async def test_a_wrong_secret_ends_at_once_with_the_reason() -> None:
    box = Sandbox(SandboxOptions(apps={APP_ID: APP_SECRET}, enforce_limits=False))
    await box.start()
    data = config_data("127.0.0.1:9092", "unused", box.url)
    data["apps"][0]["app_secret"] = "wrong"
    clock = Clock()
    client = FeishuClient(to_config(data), clock=clock)
    await client.start()
    try:
        ex, _ = executor(client, clock)  # type: ignore[arg-type]
        done = await ex.execute("default", built(REACTION))
    finally:
        await client.close()
        await box.stop()
    assert done.outcome is not None and (done.outcome.verdict, done.outcome.code) == (Verdict.PERMANENT, 10014)
    assert done.attempts == 0 and clock.slept == [] and "tenant_access_token" in done.outcome.msg


async def test_before_write_runs_once_a_token_and_connection_are_had_and_can_stop_the_call() -> None:
    clock = Clock()
    script = Script([outcome(Verdict.OK)], clock)

    class Refused(Exception):
        pass

    async def before_write() -> None:
        raise Refused  # e.g. the journal's start could not be written: nothing may go out

    with pytest.raises(Refused):
        await executor(script, clock)[0].execute("default", CALL, before_write=before_write)
    assert script.times == [], "a request left although before_write refused"
