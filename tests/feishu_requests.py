"""Requests as Feishu sends them to the event URL, built independently of ``relay.events``.

Encryption uses pycryptodome's AES (the cipher library of the official ``lark-oapi`` SDK) and every payload is
read back with the SDK's own ``AESCipher`` before a test uses it; :func:`sdk_status` runs a whole request through
the SDK's ``EventDispatcherHandler`` (decrypt, token, signature). So the relay's checks are compared with
Feishu's code, not with themselves. (lark-oapi's Python ``AESCipher`` has no ``encrypt``; this is its inverse.)
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import time
from typing import Any

from Crypto.Cipher import AES
from Crypto.Util.Padding import pad
from lark_oapi.core.model import RawRequest
from lark_oapi.core.utils import AESCipher
from lark_oapi.event.dispatcher_handler import EventDispatcherHandler
from lark_oapi.ws import client as _lark_ws

# lark-oapi's ws client creates an event loop at import and sets it as current; nothing ever closes it (an
# "unclosed event loop" ResourceWarning at exit). The tests run their own loops, so close it here.
if not _lark_ws.loop.is_running():
    _lark_ws.loop.close()
    asyncio.set_event_loop(None)

ENCRYPT_KEY = "kPu8YHX2Bf-test-encrypt-key"
TOKEN = "v-token-0123456789"


def encrypt(plaintext: bytes, key: str = ENCRYPT_KEY, iv: bytes | None = None) -> str:
    """``{"encrypt": <this>}``: base64(IV + AES-256-CBC(SHA-256(key), PKCS#7(plaintext))), checked by the SDK."""
    iv = os.urandom(16) if iv is None else iv
    cipher = AES.new(hashlib.sha256(key.encode()).digest(), AES.MODE_CBC, iv)
    text = base64.b64encode(iv + cipher.encrypt(pad(plaintext, 16))).decode()
    assert AESCipher(key).decrypt(base64.b64decode(text)) == plaintext  # the SDK reads it back
    return text


def sign(timestamp: str, nonce: str, key: str, body: bytes) -> str:
    """The formula of docs/feishu-rules.md §6.4, written out here on purpose (not imported from relay.events)."""
    return hashlib.sha256(timestamp.encode() + nonce.encode() + key.encode() + body).hexdigest()


def v2(event_type: str, event: dict[str, Any], *, event_id: str | None = None, token: str = TOKEN,
       tenant_key: str | None = "tenant-1", app_id: str = "cli_test") -> bytes:
    """A v2 envelope as Feishu's JSON (spaces and key order of its own, to show nothing re-encodes it)."""
    header: dict[str, Any] = {"event_id": event_id or os.urandom(16).hex(), "event_type": event_type,
                              "create_time": str(int(time.time() * 1000)), "token": token, "app_id": app_id}
    if tenant_key is not None:
        header["tenant_key"] = tenant_key
    return json.dumps({"schema": "2.0", "header": header, "event": event}, ensure_ascii=False,
                      indent=1).encode()


def v1(event_type: str, event: dict[str, Any], *, uuid: str | None = None, token: str = TOKEN) -> bytes:
    """A v1 envelope (compact JSON); ``event`` may carry ``app_id`` (most v1 types do)."""
    return json.dumps({"ts": "1608725989.000", "uuid": uuid or os.urandom(16).hex(), "token": token,
                       "type": "event_callback", "event": {"type": event_type, **event}}).encode()


def receive(message_id: str, chat_id: str = "oc_chat1", **kw: Any) -> bytes:
    event = {"sender": {"sender_id": {"open_id": "ou_1"}, "sender_type": "user", "tenant_key": "tenant-1"},
             "message": {"message_id": message_id, "chat_id": chat_id, "chat_type": "group",
                         "message_type": "text", "content": "{\"text\":\"你好 hi\"}", "create_time": "1",
                         "brand_new_field": {"x": 1}}}
    return v2("im.message.receive_v1", event, **kw)


def challenge(value: str = "ajls384kdjx98XX", token: str = TOKEN) -> bytes:
    return json.dumps({"challenge": value, "token": token, "type": "url_verification"}).encode()


def signed(plaintext: bytes, *, key: str = ENCRYPT_KEY, timestamp: int | None = None, nonce: str = "n0nce",
           sign_key: str | None = None, encrypt_key: str | None = None) -> tuple[dict[str, str], bytes]:
    """Headers and body of an encrypted, signed request (``sign_key``/``encrypt_key`` override for bad ones)."""
    body = json.dumps({"encrypt": encrypt(plaintext, encrypt_key or key)}).encode()
    return sign_raw(body, key=sign_key or key, timestamp=timestamp, nonce=nonce), body


def sign_raw(body: bytes, *, key: str = ENCRYPT_KEY, timestamp: int | None = None,
             nonce: str = "n0nce") -> dict[str, str]:
    ts = str(int(time.time()) if timestamp is None else timestamp)
    return {"X-Lark-Request-Timestamp": ts, "X-Lark-Request-Nonce": nonce,
            "X-Lark-Signature": sign(ts, nonce, key, body), "Content-Type": "application/json"}


def sdk_status(headers: dict[str, str], body: bytes, event_type: str, *, key: str = ENCRYPT_KEY,
               token: str = TOKEN) -> int:
    """The HTTP status the official SDK's dispatcher gives this request (200 accepted, 500 refused)."""
    handler = (EventDispatcherHandler.builder(key, token)
               .register_p2_customized_event(event_type, lambda _e: None)
               .register_p1_customized_event(event_type, lambda _e: None)
               .build())
    request = RawRequest()
    request.uri = "/feishu/events"
    request.headers = dict(headers)
    request.body = body
    return int(handler.do(request).status_code)
