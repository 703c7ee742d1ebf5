"""relay.ws.client against the sandbox's long connection (a real aiohttp WebSocket server, no Kafka).

The handler here stands in for the publish path (tests/test_ws_e2e.py has the real one, on the real broker):
it records payloads and answers what the test says, so these tests look at the protocol only: the endpoint,
the handshake, pings and pong config, fragments, answers, the watchdog, reconnecting and stopping.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import msgspec
import pytest

from relay.config import Config, parse_config
from relay.errors import LongConnectionError
from relay.metrics import Metrics
from relay.sandbox import Sandbox, SandboxOptions, WsOptions
from relay.sandbox.emit import envelope
from relay.ws import LongConnection
from relay.ws.protocol import ClientConfig

APP_ID = "cli_ws_test"
SECRET = "ws-secret"

# fast but Feishu-shaped: ping every 0.3 s, reconnect after 0.1 s + up to 0.1 s of jitter
FAST = WsOptions(ping_interval=0.3, reconnect_interval=0.1, reconnect_nonce=0.1, ack_timeout=1.0,
                 redelivery=(0.2, 0.2, 0.2))
# the client's settings before the endpoint's (which FAST gives once it answers)
INITIAL = ClientConfig(reconnect_interval=0.1, reconnect_nonce=0.1, ping_interval=0.3)


def config(**inbound: object) -> Config:
    return parse_config({"apps": [{"name": "ws", "app_id": APP_ID, "app_secret": SECRET,
                                   "inbound": {"mode": "websocket"}}],
                         "inbound": {"ws_liveness_grace": 1.0, "ws_connect_timeout": 2.0, **inbound}}, env={})


class Recorder:
    """An EventHandler answering ``code`` (200 unless told) after ``delay`` seconds, recording what came."""

    def __init__(self) -> None:
        self.payloads: list[bytes] = []
        self.code = 200
        self.data: bytes | None = None
        self.delay = 0.0

    async def __call__(self, payload: bytes, started: float) -> tuple[int, bytes | None]:
        self.payloads.append(payload)
        await asyncio.sleep(self.delay)
        return self.code, self.data


async def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    box = Sandbox(SandboxOptions(apps={APP_ID: SECRET}, ws=FAST))
    config_url = await box.start()
    assert config_url
    yield box
    await box.stop()


Runner = Callable[..., Awaitable[tuple[LongConnection, Recorder, "asyncio.Task[None]"]]]


@pytest.fixture
async def run(sandbox: Sandbox) -> AsyncIterator[Runner]:
    session = aiohttp.ClientSession()
    tasks: list[asyncio.Task[None]] = []

    async def start(cfg: Config | None = None, wait: bool = True,
                    ) -> tuple[LongConnection, Recorder, asyncio.Task[None]]:
        cfg = cfg or config()
        cfg = parse_config({**_plain(cfg), "feishu": {"base_url": sandbox.url}}, env={})
        recorder = Recorder()
        conn = LongConnection(cfg.apps[0], cfg, recorder, session, Metrics(), rng=random.Random(3),
                              initial=INITIAL)
        task = asyncio.create_task(conn.run())
        tasks.append(task)
        if wait:
            await eventually(lambda: conn.connected or task.done())
        return conn, recorder, task

    yield start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await session.close()


def _plain(cfg: Config) -> dict[str, object]:
    def enc(obj: object) -> object:
        return obj.reveal() if hasattr(obj, "reveal") else obj

    data: dict[str, object] = msgspec.to_builtins(cfg, enc_hook=enc)
    return data


def event(event_id: str, event_type: str = "im.message.receive_v1") -> bytes:
    return envelope(event_type, event_id=event_id, now=0, app_id=APP_ID, verification_token=None)


async def test_events_arrive_once_answered_200_with_the_frame_echoed(sandbox: Sandbox, run: Runner) -> None:
    _conn, recorder, _ = await run()
    deliveries = [sandbox.ws.push(APP_ID, event(f"ev{i}"), event_id=f"ev{i}") for i in range(20)]
    await asyncio.wait_for(asyncio.gather(*(d.done.wait() for d in deliveries)), 10)
    assert [d.answers for d in deliveries] == [[200]] * 20
    assert sorted(json.loads(p)["header"]["event_id"] for p in recorder.payloads) == sorted(
        f"ev{i}" for i in range(20))
    assert sandbox.ws.violations == []


async def test_pings_go_out_and_the_pong_config_is_adopted(sandbox: Sandbox, run: Runner) -> None:
    conn, _, _ = await run()
    assert conn.config.ping_interval == 0.3  # the endpoint's ClientConfig
    before = sandbox.ws.handshakes
    await asyncio.sleep(1.5)  # five ping intervals: pings answered, the watchdog content, no reconnect
    assert sandbox.ws.handshakes == before and conn.connected
    sandbox.ws.options = msgspec.structs.replace(FAST, ping_interval=0.2)
    await eventually(lambda: conn.config.ping_interval == 0.2)  # a pong's config replaces the current one
    assert sandbox.ws.violations == []


async def test_fragmented_events_are_reassembled(sandbox: Sandbox, run: Runner) -> None:
    sandbox.ws.options = msgspec.structs.replace(FAST, fragment_size=50)
    _conn, recorder, _ = await run()
    payload = event("big")
    delivery = sandbox.ws.push(APP_ID, payload, event_id="big")
    await asyncio.wait_for(delivery.done.wait(), 10)
    assert delivery.answers == [200]
    assert recorder.payloads == [payload] and len(payload) > 200
    assert sandbox.ws.violations == []


async def test_an_event_answered_500_is_redelivered_until_200(sandbox: Sandbox, run: Runner) -> None:
    _conn, recorder, _ = await run()
    recorder.code = 500
    delivery = sandbox.ws.push(APP_ID, event("ev-retry"), event_id="ev-retry")
    await eventually(lambda: len(delivery.answers) >= 2)
    recorder.code = 200
    await asyncio.wait_for(delivery.done.wait(), 10)
    assert delivery.answers[:2] == [500, 500] and delivery.answers[-1] == 200 and delivery.acknowledged
    assert sandbox.ws.violations == []


async def test_a_callback_is_answered_with_its_reply_and_card_frames_are_answered_too(
        sandbox: Sandbox, run: Runner) -> None:
    _conn, recorder, _ = await run()
    recorder.data = b'{"toast":{"type":"info","content":"ok"}}'
    card = sandbox.ws.push(APP_ID, event("cb1", "card.action.trigger"), event_id="cb1",
                           event_type="card.action.trigger", frame_type="card")
    await asyncio.wait_for(card.done.wait(), 10)
    assert card.answers == [200] and card.data == recorder.data
    assert sandbox.ws.violations == []


async def test_a_half_open_socket_is_given_up_and_a_new_one_made(
        sandbox: Sandbox, run: Runner, caplog: pytest.LogCaptureFixture) -> None:
    conn, _recorder, _ = await run()
    assert conn.connections == 1
    sandbox.ws.half_open()  # pings go unanswered, nothing comes: the socket looks open to the client
    delivery = sandbox.ws.push(APP_ID, event("ev-lost"), event_id="ev-lost")
    with caplog.at_level(logging.WARNING, logger="relay.ws.client"):
        # PingInterval 0.3 + grace 1.0: noticed within 1.3 s; reconnected within the jitter after
        await eventually(lambda: conn.connections == 2 and conn.connected, timeout=5)
    assert any("half-open" in r.getMessage() and "reconnecting" in r.getMessage() for r in caplog.records)
    await asyncio.wait_for(delivery.done.wait(), 10)  # the event lost on the dead socket is redelivered
    assert delivery.answers[0] is None and delivery.answers[-1] == 200
    assert conn.problem() is None


async def test_a_closed_connection_is_reconnected(sandbox: Sandbox, run: Runner) -> None:
    conn, _, _ = await run()
    await sandbox.ws.disconnect()
    await eventually(lambda: conn.connections == 2 and conn.connected)


@pytest.mark.parametrize(("status", "autherrcode"), [(514, 1000040350), (403, 0)])
async def test_a_refusal_that_means_stop_ends_in_one_clear_error(
        sandbox: Sandbox, run: Runner, status: int, autherrcode: int) -> None:
    sandbox.ws.refuse_handshake(status, autherrcode)
    conn, _, task = await run(wait=False)
    with pytest.raises(LongConnectionError) as caught:
        await asyncio.wait_for(task, 5)
    message = str(caught.value)
    assert message.startswith("apps[ws]: Feishu refused the long connection, not retrying: handshake refused: "
                              f"status {status}") and "\n" not in message
    assert sandbox.ws.endpoint_calls == 1  # not retried
    assert not conn.connected and conn.problem() is not None


async def test_a_retryable_handshake_refusal_and_endpoint_error_are_retried(sandbox: Sandbox, run: Runner) -> None:
    sandbox.ws.refuse_handshake(514, 1000040351)  # an auth error that is not the connection limit
    sandbox.ws.fail_endpoint(1000040345)  # "system busy", in no SDK's table
    conn, _, task = await run(wait=False)
    await eventually(lambda: sandbox.ws.endpoint_calls >= 3)
    assert not task.done() and not conn.connected
    assert "1000040345" in (conn.problem() or "")
    sandbox.ws.fail_endpoint(None)
    await eventually(lambda: "handshake refused: status 514" in (conn.problem() or ""))
    sandbox.ws.refuse_handshake(None)
    await eventually(lambda: conn.connected)


async def test_wrong_credentials_stop(sandbox: Sandbox, run: Runner) -> None:
    cfg = parse_config({"apps": [{"name": "ws", "app_id": APP_ID, "app_secret": "wrong",
                                  "inbound": {"mode": "websocket"}}]}, env={})
    _conn, _, task = await run(cfg, wait=False)
    with pytest.raises(LongConnectionError, match="code 10014"):
        await asyncio.wait_for(task, 5)


async def test_an_endpoint_that_never_answers_times_out_and_is_retried() -> None:
    held: list[asyncio.StreamWriter] = []
    server = await asyncio.start_server(lambda r, w: held.append(w), "127.0.0.1", 0)  # accepts, never answers
    port = server.sockets[0].getsockname()[1]
    silent = parse_config({**_plain(config(ws_connect_timeout=0.3)),
                           "feishu": {"base_url": f"http://127.0.0.1:{port}"}}, env={})
    try:
        async with aiohttp.ClientSession() as session:
            stuck = LongConnection(silent.apps[0], silent, Recorder(), session, Metrics(), rng=random.Random(1),
                                   initial=INITIAL)
            task = asyncio.create_task(stuck.run())
            await eventually(lambda: "timed out after 0.3 s" in (stuck.problem() or ""))
            assert not task.done()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_two_connections_for_one_app_share_the_events(sandbox: Sandbox, run: Runner) -> None:
    _first, rec1, _ = await run()
    _second, rec2, _ = await run()
    assert sandbox.ws.connections(APP_ID) == 2
    deliveries = [sandbox.ws.push(APP_ID, event(f"e{i}"), event_id=f"e{i}") for i in range(10)]
    await asyncio.wait_for(asyncio.gather(*(d.done.wait() for d in deliveries)), 10)
    assert len(rec1.payloads) + len(rec2.payloads) == 10 and rec1.payloads and rec2.payloads


async def emit_cli(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "relay", "sandbox", "emit", *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_relay_sandbox_emit_websocket_pushes_over_the_connection(sandbox: Sandbox, run: Runner) -> None:
    code, out = await emit_cli("--websocket", sandbox.url, "--event-type", "im.message.receive_v1",
                               "--app-id", APP_ID, "--event-id", "ev-cli")
    assert code == 1 and "sandbox HTTP 409" in out and "no long connection" in out  # nobody connected yet
    _, recorder, _ = await run()
    code, out = await emit_cli("--websocket", sandbox.url, "--event-type", "im.message.receive_v1",
                               "--app-id", APP_ID, "--event-id", "ev-cli")
    assert (code, out.strip()) == (0, "im.message.receive_v1 ev-cli -> over the long connection, answers: 200")
    assert [json.loads(p)["header"]["event_id"] for p in recorder.payloads] == ["ev-cli"]


async def test_past_the_in_flight_bound_an_event_is_answered_500_at_once_and_redelivered(
        sandbox: Sandbox, run: Runner) -> None:
    sandbox.ws.options = msgspec.structs.replace(FAST, redelivery=(0.5,) * 10)
    _, recorder, _ = await run(config(ws_max_in_flight=1))
    recorder.delay = 0.1  # the first event holds the only slot for a while
    deliveries = [sandbox.ws.push(APP_ID, event(f"f{i}"), event_id=f"f{i}") for i in range(3)]
    await asyncio.wait_for(asyncio.gather(*(d.done.wait() for d in deliveries)), 10)
    assert all(d.acknowledged for d in deliveries)
    assert any(d.answers[0] == 500 for d in deliveries)  # refused at once, not left unanswered
    assert sandbox.ws.violations == []


async def test_a_data_frame_of_an_unknown_type_is_answered_500(sandbox: Sandbox, run: Runner) -> None:
    _, recorder, _ = await run()
    delivery = sandbox.ws.push(APP_ID, event("odd"), event_id="odd", frame_type="mystery")
    await eventually(lambda: len(delivery.answers) >= 1)
    assert delivery.answers[0] == 500 and recorder.payloads == []
    assert sandbox.ws.violations == []


async def test_a_server_that_keeps_dropping_the_connection_backs_off_to_the_interval(
        sandbox: Sandbox, run: Runner) -> None:
    conn, _, _ = await run()
    for made in range(2, 5):  # each connection dropped at once, well within a ping interval
        await sandbox.ws.disconnect()
        await eventually(lambda made=made: conn.connections == made and conn.connected)
    assert conn.reconnect_attempts == 3  # not reset by connections that did not last: interval + jitter
    await asyncio.sleep(0.4)  # one that lasts a ping interval (0.3 s) was healthy
    await sandbox.ws.disconnect()
    await eventually(lambda: conn.connections == 5 and conn.connected)
    assert conn.reconnect_attempts == 1


async def test_sandbox_stats_and_reset_cover_the_long_connection(sandbox: Sandbox, run: Runner) -> None:
    await run()
    delivery = sandbox.ws.push(APP_ID, event("st"), event_id="st")
    await asyncio.wait_for(delivery.done.wait(), 10)
    async with aiohttp.ClientSession() as http, http.get(sandbox.url + "/_sandbox/ws/stats") as resp:
        ws = await resp.json()
    assert ws["connections"] == 1 and ws["handshakes"] == 1 and ws["violations"] == []
    assert ws["deliveries"] == [{"event_id": "st", "answers": [200], "acknowledged": True}]
    sandbox.reset()
    assert sandbox.ws.deliveries == [] and sandbox.ws.connections() == 1


def test_sandbox_options_take_the_long_connection_settings() -> None:
    options = msgspec.json.decode(b'{"ws": {"ping_interval": 5, "fragment_size": 100}}', type=SandboxOptions)
    assert options.ws.ping_interval == 5 and options.ws.fragment_size == 100
    with pytest.raises(msgspec.ValidationError, match="ping_intervall"):
        msgspec.json.decode(b'{"ws": {"ping_intervall": 5}}', type=SandboxOptions)
