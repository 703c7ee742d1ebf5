"""relay.events: decryption and signature against known answers and the official SDK; the request checks."""

from __future__ import annotations

import base64
import hashlib
import json
import time

import pytest
from feishu_requests import (
    ENCRYPT_KEY,
    TOKEN,
    challenge,
    encrypt,
    receive,
    sdk_status,
    sign_raw,
    signed,
    v1,
    v2,
)
from multidict import CIMultiDict

from relay.config import AppConfig, InboundConfig, Secret
from relay.errors import SignatureError
from relay.events import (
    Challenge,
    Event,
    MessageRead,
    MessageRecalled,
    MessageReceived,
    Reaction,
    decrypt,
    signature,
    verify_request,
    verify_signature,
)

CFG = InboundConfig()
APP = AppConfig(name="default", app_id="cli_test", app_secret=Secret("s"), verification_token=Secret(TOKEN),
                encrypt_key=Secret(ENCRYPT_KEY))
PLAIN_APP = AppConfig(name="plain", app_id="cli_test", app_secret=Secret("s"), verification_token=Secret(TOKEN))


def check(headers: dict[str, str], body: bytes, app: AppConfig = APP, now: float | None = None) -> object:
    return verify_request(app, CIMultiDict(headers), body, time.time() if now is None else now, CFG)


def reason(headers: dict[str, str], body: bytes, app: AppConfig = APP, now: float | None = None) -> str:
    with pytest.raises(SignatureError) as info:
        check(headers, body, app, now)
    assert 400 <= info.value.status < 500
    return info.value.reason


# --- known answers -----------------------------------------------------------------------------------------------

def test_decrypt_known_answer_vector() -> None:
    # feishu-facts §5.3
    assert decrypt("P37w+VZImNgPEO1RBhJ6RtKl7n6zymIbEG1pReEzghk=", "test key") == b"hello world"


def test_known_answer_vector_agrees_with_the_sdk() -> None:
    from lark_oapi.core.utils import AESCipher

    assert AESCipher("test key").decrypt_str("P37w+VZImNgPEO1RBhJ6RtKl7n6zymIbEG1pReEzghk=") == "hello world"


def test_signature_formula() -> None:
    body = b'{"encrypt":"abc"}'
    expected = hashlib.sha256(b"1700000000" + b"nonce" + b"key" + body).hexdigest()
    assert signature("1700000000", "nonce", "key", body) == expected
    # a fixed value, so a change of formula cannot pass by changing both sides
    assert signature("1", "2", "3", b"4") == hashlib.sha256(b"1234").hexdigest()
    assert verify_signature("1700000000", "nonce", "key", body, expected)
    assert verify_signature("1700000000", "nonce", "key", body, expected.upper())
    assert not verify_signature("1700000000", "nonce", "key", body + b" ", expected)
    assert not verify_signature("1700000000", "nonce", "key", body, "")
    assert not verify_signature("1700000000", "nonce", "key", body, "ünïcode")


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 4096, 100_000])
def test_decrypts_what_the_sdk_cipher_produces(size: int) -> None:
    plaintext = (b'{"k":"' + b"x" * size + b'"}')
    assert decrypt(encrypt(plaintext), ENCRYPT_KEY) == plaintext


def test_decrypt_rejects_bad_base64_padding_and_wrong_key() -> None:
    good = encrypt(b'{"a":1}')
    for bad in ("not base64!!", good[:-2] + "!!", good + "\n"):
        with pytest.raises(SignatureError, match="base64"):
            decrypt(bad, ENCRYPT_KEY)
    raw = base64.b64decode(good)
    for bad_raw in (raw[:16], raw[:-1], raw + b"x" * 16, raw[:16] + b"\0" * 16):
        with pytest.raises(SignatureError, match="ciphertext"):
            decrypt(base64.b64encode(bad_raw).decode(), ENCRYPT_KEY)
    # a pad byte wrong but the last one plausible: strict PKCS#7 checks every pad byte
    from Crypto.Cipher import AES

    iv = b"\1" * 16
    key = hashlib.sha256(ENCRYPT_KEY.encode()).digest()
    forged = AES.new(key, AES.MODE_CBC, iv).encrypt(b"0123456789abc\1\3\3")
    with pytest.raises(SignatureError, match="ciphertext"):
        decrypt(base64.b64encode(iv + forged).decode(), ENCRYPT_KEY)
    wrong = 0
    for i in range(20):  # a wrong key fails the padding check (or, rarely, yields garbage that is not JSON)
        try:
            decrypt(encrypt(b'{"a":%d}' % i), "another key")
        except SignatureError:
            wrong += 1
    assert wrong >= 15


# --- whole requests, each also shown to the official SDK ------------------------------------------------------

def test_valid_signed_encrypted_event() -> None:
    plain = receive("om_1", chat_id="oc_9")
    headers, body = signed(plain)
    assert sdk_status(headers, body, "im.message.receive_v1") == 200
    event = check(headers, body)
    assert isinstance(event, Event)
    assert event.plaintext == plain
    assert (event.schema, event.event_type, event.tenant_key) == ("2.0", "im.message.receive_v1", "tenant-1")
    assert isinstance(event.view, MessageReceived)
    assert event.key == "oc_9" and event.message_id == "om_1"
    assert event.dedup_keys("default") == (f"default\0event\0{event.event_id}", "default\0message\0om_1")
    assert event.headers("default") == [("event_type", b"im.message.receive_v1"),
                                        ("event_id", event.event_id.encode()), ("app", b"default"),
                                        ("tenant_key", b"tenant-1")]


@pytest.mark.parametrize(("plain", "view", "key"), [
    (v2("im.message.message_read_v1", {"reader": {"read_time": "1"}, "message_id_list": ["om_r1", "om_r2"]}),
     MessageRead, "om_r1"),
    (v2("im.message.recalled_v1", {"message_id": "om_x", "chat_id": "oc_x", "recall_type": "message_owner"}),
     MessageRecalled, "oc_x"),
    (v2("im.message.reaction.created_v1", {"message_id": "om_y", "reaction_type": {"emoji_type": "SMILE"}}),
     Reaction, "om_y"),
    (v2("im.message.reaction.deleted_v1", {"message_id": "om_z", "operator_type": "app", "app_id": "cli_1"}),
     Reaction, "om_z"),
])
def test_typed_views_choose_the_key(plain: bytes, view: type, key: str) -> None:
    headers, body = signed(plain)
    event = check(headers, body)
    assert isinstance(event, Event) and isinstance(event.view, view)
    assert event.key == key
    assert len(event.dedup_keys("a")) == 1


def test_other_event_types_are_relayed_untouched_keyed_by_event_id() -> None:
    plain = v2("contact.user.created_v3", {"object": {"open_id": "ou_1"}}, event_id="ev-77", tenant_key=None)
    headers, body = signed(plain)
    event = check(headers, body)
    assert isinstance(event, Event) and event.view is None
    assert (event.key, event.plaintext) == ("ev-77", plain)
    assert [name for name, _ in event.headers("x")] == ["event_type", "event_id", "app"]


def test_v1_envelope() -> None:
    plain = v1("message", {"tenant_key": "t-v1", "open_chat_id": "oc_1"}, uuid="u-1")
    headers, body = signed(plain)
    assert sdk_status(headers, body, "message") == 200
    event = check(headers, body)
    assert isinstance(event, Event)
    assert (event.schema, event.event_type, event.event_id, event.tenant_key) == ("1.0", "message", "u-1", "t-v1")


def test_challenge_plain_and_encrypted_need_no_signature() -> None:
    assert check({}, challenge("c1"), PLAIN_APP) == Challenge("c1")
    assert check({}, challenge("c2"), APP) == Challenge("c2")
    body = json.dumps({"encrypt": encrypt(challenge("c3"))}).encode()
    assert sdk_status({}, body, "x") == 200
    assert check({}, body) == Challenge("c3")
    assert reason({}, challenge("c4", token="wrong"), PLAIN_APP) == "token"
    assert reason({}, json.dumps({"encrypt": encrypt(challenge("c5", token="bad"))}).encode()) == "token"


def test_unsigned_app_checks_the_token_only() -> None:
    plain = receive("om_p")
    assert isinstance(check({}, plain, PLAIN_APP), Event)
    assert reason({}, receive("om_p", token="nope"), PLAIN_APP) == "token"
    assert reason({}, json.dumps({"encrypt": encrypt(plain)}).encode(), PLAIN_APP) == "no_encrypt_key"


def test_every_bad_request_is_refused_as_the_sdk_refuses_it() -> None:
    plain = receive("om_b")
    headers, body = signed(plain)
    cases = {
        "bad signature": ({**headers, "X-Lark-Signature": "0" * 64}, body),
        "signature over another body": (sign_raw(json.dumps({"encrypt": encrypt(receive("om_c"))}).encode()),
                                        body),
        "no signature": ({}, body),
        "wrong token": signed(receive("om_b", token="other")),
        "signed with another key": signed(plain, sign_key="other key"),
    }
    for name, (h, b) in cases.items():
        assert sdk_status(h, b, "im.message.receive_v1") != 200, name
        assert reason(h, b) in ("signature", "token"), name


def test_timestamp_window() -> None:
    now = 1_800_000_000
    plain = receive("om_t")
    assert isinstance(check(*signed(plain, timestamp=now - 7 * 3600 + 5), now=now), Event)  # the 6 h redelivery
    assert isinstance(check(*signed(plain, timestamp=now + 290), now=now), Event)
    assert reason(*signed(plain, timestamp=now - 7 * 3600 - 5), now=now) == "timestamp_stale"
    assert reason(*signed(plain, timestamp=now + 310), now=now) == "timestamp_future"
    headers, body = signed(plain)
    headers["X-Lark-Request-Timestamp"] = "soon"
    headers["X-Lark-Signature"] = signature("soon", "n0nce", ENCRYPT_KEY, body)
    assert reason(headers, body) == "timestamp"


def test_decryption_errors_after_a_valid_signature() -> None:
    def signed_body(value: str) -> tuple[dict[str, str], bytes]:
        body = json.dumps({"encrypt": value}).encode()
        return sign_raw(body), body

    good = base64.b64decode(encrypt(receive("om_d")))
    assert reason(*signed_body("%%%not-base64")) == "base64"
    assert reason(*signed_body(base64.b64encode(good[:-3]).decode())) == "ciphertext"
    assert reason(*signed_body(base64.b64encode(good[:-16] + bytes(16)).decode())) in ("ciphertext", "json")
    assert reason(*signed(receive("om_d"), encrypt_key="another key")) in ("ciphertext", "json")
    assert reason(*signed(b"not json at all")) == "json"
    assert reason(*signed(b"[1, 2]")) == "envelope"
    assert reason(*signed(b'{"schema": "2.0", "header": {"event_type": "x"}}')) == "envelope"  # no event id
    assert reason(*signed(b'{"schema": "2.0", "header": {"event_id": 5, "event_type": "x"}}')) == "envelope"
    # without a valid signature, none of these is decrypted for an event: one answer for all (no padding oracle)
    for value in ("%%%", base64.b64encode(good[:-16] + bytes(16)).decode(), base64.b64encode(good).decode()):
        assert reason({}, json.dumps({"encrypt": value}).encode()) == "signature"
    assert reason({}, b"not json") == "signature"
