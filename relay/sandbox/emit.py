"""Sample Feishu events, encrypted and signed the way Feishu sends them, posted to any webhook URL.

``relay sandbox emit --url http://127.0.0.1:8080/feishu/events --event-type im.message.receive_v1
--encrypt-key K --verification-token T`` lets a team test its own webhook (the relay's, or anything else
that takes Feishu events) without writing a Feishu simulator.

What a request looks like (docs/feishu-rules.md §6):

* the body is a schema 2.0 envelope (``header.event_id``, ``event_type``, ``create_time`` in ms, ``token`` = the
  verification token, ``app_id``, ``tenant_key``) around a sample ``event`` of that type;
* with an encrypt key, the body becomes ``{"encrypt": base64(IV + AES-256-CBC(SHA-256(key), PKCS#7(plain)))}``
  and the request carries ``X-Lark-Request-Timestamp``, ``X-Lark-Request-Nonce`` and ``X-Lark-Signature`` = hex
  SHA-256(timestamp + nonce + key + body); without one, the plain envelope, unsigned (as Feishu does).

The event types are the IM events of Feishu's message overview (``SAMPLES``) and the two callbacks the relay
answers; their fields follow the event pages (§6.7). For those two, :func:`post` times the answer and judges
it the way Feishu would (:mod:`relay.sandbox.callbacks`: 3 s, the answer shapes, 200671 / 200673). Building a
request is pure (time, ids and IV are passed in); only :func:`post` and :func:`push` do I/O.

``relay sandbox emit --websocket http://127.0.0.1:8090 ...`` instead asks a running sandbox to push the sample
over its long connection to the relay connected for that app (:func:`push`, ``POST /_sandbox/ws/emit``): the
sandbox sends it as Feishu would (frames, fragments, redelivery until answered 200) and reports the answers.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from relay.events import NONCE_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, signature
from relay.sandbox.callbacks import Verdict, judge


@dataclass(frozen=True, slots=True)
class Ids:
    """The ids a sample refers to; any left empty is made up."""

    chat_id: str = "oc_sandbox_chat"
    message_id: str = "om_sandbox_message"
    open_id: str = "ou_sandbox_user"
    tenant_key: str = "sandbox-tenant"
    action_value: dict[str, Any] | None = None  # a card click's action.value (default {"choice": "approve"})


def _user(ids: Ids) -> dict[str, Any]:
    return {"open_id": ids.open_id, "union_id": "on_" + ids.open_id.removeprefix("ou_"), "user_id": "sandbox"}


def _receive(ids: Ids, now_ms: int) -> dict[str, Any]:
    return {"sender": {"sender_id": _user(ids), "sender_type": "user", "tenant_key": ids.tenant_key},
            "message": {"message_id": ids.message_id, "root_id": "", "parent_id": "", "create_time": str(now_ms),
                        "update_time": str(now_ms), "chat_id": ids.chat_id, "chat_type": "group",
                        "message_type": "text", "content": json.dumps({"text": "hello from the sandbox"}),
                        "mentions": []}}


def _read(ids: Ids, now_ms: int) -> dict[str, Any]:
    return {"reader": {"reader_id": _user(ids), "read_time": str(now_ms), "tenant_key": ids.tenant_key},
            "message_id_list": [ids.message_id]}


def _recalled(ids: Ids, now_ms: int) -> dict[str, Any]:
    return {"message_id": ids.message_id, "chat_id": ids.chat_id, "recall_time": str(now_ms),
            "recall_type": "message_owner"}


def _reaction(ids: Ids, now_ms: int) -> dict[str, Any]:
    return {"message_id": ids.message_id, "reaction_type": {"emoji_type": "THUMBSUP"}, "operator_type": "user",
            "user_id": _user(ids), "action_time": str(now_ms)}


def _card_action(ids: Ids, now_ms: int) -> dict[str, Any]:
    return {"operator": {"tenant_key": ids.tenant_key, **_user(ids)}, "token": "c-sandbox-callback-token",
            "action": {"tag": "button", "value": ids.action_value or {"choice": "approve"}}, "host": "im_message",
            "context": {"open_message_id": ids.message_id, "open_chat_id": ids.chat_id}}


def _preview(ids: Ids, now_ms: int) -> dict[str, Any]:
    return {"operator": {"tenant_key": ids.tenant_key, "open_id": ids.open_id}, "host": "im_message",
            "context": {"url": "https://example.com/item/1", "preview_token": "sandbox-preview-token",
                        "open_message_id": ids.message_id, "open_chat_id": ids.chat_id}}


SAMPLES: Final[dict[str, Callable[[Ids, int], dict[str, Any]]]] = {
    "im.message.receive_v1": _receive,
    "im.message.message_read_v1": _read,
    "im.message.recalled_v1": _recalled,
    "im.message.reaction.created_v1": _reaction,
    "im.message.reaction.deleted_v1": _reaction,
    "card.action.trigger": _card_action,
    "url.preview.get": _preview,
}
# the samples Feishu waits for an answer to: emit judges the answer as Feishu would
CALLBACKS: Final = frozenset({"card.action.trigger", "url.preview.get"})


def envelope(event_type: str, *, event_id: str, now: float, app_id: str, verification_token: str | None,
             ids: Ids = Ids()) -> bytes:
    """The plaintext: a schema 2.0 envelope around the sample of ``event_type``; ValueError for an unknown type."""
    sample = SAMPLES.get(event_type)
    if sample is None:
        raise ValueError(f"--event-type: {event_type!r} is not one of {', '.join(SAMPLES)}")
    now_ms = int(now * 1000)
    header = {"event_id": event_id, "event_type": event_type, "create_time": str(now_ms),
              "token": verification_token or "", "app_id": app_id, "tenant_key": ids.tenant_key}
    return json.dumps({"schema": "2.0", "header": header, "event": sample(ids, now_ms)},
                      ensure_ascii=False).encode()


def encrypt(plaintext: bytes, encrypt_key: str, iv: bytes) -> str:
    """``{"encrypt": <this>}``: base64(IV + AES-256-CBC(key = SHA-256(encrypt_key), PKCS#7(plaintext)))."""
    if len(iv) != 16:
        raise ValueError("encrypt: the IV is 16 bytes")
    key = hashlib.sha256(encrypt_key.encode()).digest()
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return base64.b64encode(iv + encryptor.update(padded) + encryptor.finalize()).decode()


def request(plaintext: bytes, *, encrypt_key: str | None, now: float, nonce: str,
            iv: bytes) -> tuple[dict[str, str], bytes]:
    """Headers and body of the POST: encrypted and signed with an encrypt key, the plain envelope without one."""
    headers = {"Content-Type": "application/json; charset=utf-8"}
    if not encrypt_key:
        return headers, plaintext
    body = json.dumps({"encrypt": encrypt(plaintext, encrypt_key, iv)}).encode()
    timestamp = str(int(now))
    headers.update({TIMESTAMP_HEADER: timestamp, NONCE_HEADER: nonce,
                    SIGNATURE_HEADER: signature(timestamp, nonce, encrypt_key, body)})
    return headers, body


@dataclass(frozen=True, slots=True)
class Emitted:
    """What the webhook answered, how fast, and for a callback Feishu's verdict on it (``relay.sandbox.callbacks``)."""

    event_id: str
    status: int
    body: str
    elapsed: float = 0.0
    verdict: Verdict | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300 and (self.verdict is None or self.verdict.ok)


async def post(url: str, event_type: str, *, encrypt_key: str | None = None, verification_token: str | None = None,
               app_id: str = "cli_sandbox", ids: Ids = Ids(), event_id: str | None = None,
               timeout: float = 10.0) -> Emitted:
    """Build one sample event of ``event_type`` and POST it to ``url``; the answer, whatever its status."""
    import aiohttp

    now = time.time()
    event_id = event_id or os.urandom(16).hex()
    plaintext = envelope(event_type, event_id=event_id, now=now, app_id=app_id,
                         verification_token=verification_token, ids=ids)
    headers, body = request(plaintext, encrypt_key=encrypt_key, now=now, nonce=os.urandom(8).hex(),
                            iv=os.urandom(16))
    started = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http, \
            http.post(url, data=body, headers=headers) as resp:
        answer = await resp.read()
        elapsed = time.perf_counter() - started
    verdict = judge(event_type, resp.status, answer, elapsed) if event_type in CALLBACKS else None
    return Emitted(event_id=event_id, status=resp.status, body=answer[:500].decode(errors="replace"),
                   elapsed=elapsed, verdict=verdict)


@dataclass(frozen=True, slots=True)
class Pushed:
    """What became of an event pushed over the sandbox's long connection: each attempt's answer code."""

    event_id: str
    status: int  # the sandbox's HTTP status (409: no relay connected for the app)
    answers: tuple[int | None, ...]
    acknowledged: bool
    body: str


async def push(sandbox_url: str, event_type: str, *, verification_token: str | None = None,
               app_id: str = "cli_sandbox", ids: Ids = Ids(), event_id: str | None = None,
               timeout: float = 60.0) -> Pushed:
    """Have the sandbox at ``sandbox_url`` push one sample event over its long connection; wait for the outcome."""
    import aiohttp

    event_id = event_id or os.urandom(16).hex()
    plaintext = envelope(event_type, event_id=event_id, now=time.time(), app_id=app_id,
                         verification_token=verification_token, ids=ids)
    body = {"app_id": app_id, "event_id": event_id, "event_type": event_type, "payload": plaintext.decode()}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http, \
            http.post(sandbox_url.rstrip("/") + "/_sandbox/ws/emit", json=body) as resp:
        text = (await resp.text())[:500]
        answer = json.loads(text) if resp.status == 200 else {}
    return Pushed(event_id=event_id, status=resp.status, answers=tuple(answer.get("answers", ())),
                  acknowledged=bool(answer.get("acknowledged")), body=text)
