"""relay.events: decryption and signature against known answers and the official SDK; the request checks; the
record (the token cut out, byte for byte) and its key for every event type."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from typing import Any

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

import relay.events
from relay.config import AppConfig, InboundConfig, Secret
from relay.errors import SignatureError
from relay.events import (
    CHALLENGE_MAX_BYTES,
    Challenge,
    Event,
    SignedHeaders,
    decrypt,
    parse_envelope,
    read_signature_headers,
    signature,
    verify_request,
    verify_signature,
    without_member,
    without_token,
)

CFG = InboundConfig()
APP = AppConfig(name="default", app_id="cli_test", app_secret=Secret("s"), verification_token=Secret(TOKEN),
                encrypt_key=Secret(ENCRYPT_KEY))
PLAIN_APP = AppConfig(name="plain", app_id="cli_test", app_secret=Secret("s"), verification_token=Secret(TOKEN))


def check(headers: dict[str, str], body: bytes, app: AppConfig = APP, now: float | None = None) -> object:
    signed_headers = read_signature_headers(CIMultiDict(headers))
    return verify_request(app, signed_headers, body, time.time() if now is None else now, CFG)


def refusal(headers: dict[str, str], body: bytes, app: AppConfig = APP, now: float | None = None) -> tuple[int, str]:
    with pytest.raises(SignatureError) as info:
        check(headers, body, app, now)
    assert 400 <= info.value.status < 500
    return info.value.status, info.value.reason


def reason(headers: dict[str, str], body: bytes, app: AppConfig = APP, now: float | None = None) -> str:
    return refusal(headers, body, app, now)[1]


def event_of(headers: dict[str, str], body: bytes, app: AppConfig = APP) -> Event:
    event = check(headers, body, app)
    assert isinstance(event, Event)
    return event


# --- known answers -----------------------------------------------------------------------------------------------

def test_decrypt_known_answer_vector() -> None:
    # docs/feishu-rules.md §6.3
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
    assert verify_signature(SignedHeaders("1700000000", "nonce", expected), "key", body)
    upper = read_signature_headers(CIMultiDict({"X-Lark-Request-Timestamp": "1700000000",
                                                "X-Lark-Request-Nonce": "nonce", "X-Lark-Signature": expected.upper()}))
    assert upper is not None and verify_signature(upper, "key", body)
    assert not verify_signature(SignedHeaders("1700000000", "nonce", expected), "key", body + b" ")


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 4096, 100_000])
def test_decrypts_what_the_sdk_cipher_produces(size: int) -> None:
    plaintext = (b'{"k":"' + b"x" * size + b'"}')
    assert decrypt(encrypt(plaintext), ENCRYPT_KEY) == plaintext


def test_decrypt_rejects_bad_base64_padding_and_wrong_key_with_one_reason() -> None:
    # a fixed IV: with encrypt()'s random one, the extra block and the zero block below decrypt to bytes that end
    # in a valid pad about one time in 256 (no MAC in Feishu's scheme), and the test failed at random
    from Crypto.Cipher import AES
    from Crypto.Util.Padding import pad

    iv = b"\1" * 16
    key = hashlib.sha256(ENCRYPT_KEY.encode()).digest()
    raw = iv + AES.new(key, AES.MODE_CBC, iv).encrypt(pad(b'{"a":1}', 16))
    good = base64.b64encode(raw).decode()
    assert decrypt(good, ENCRYPT_KEY) == b'{"a":1}'
    bad_values = ["not base64!!", good[:-2] + "!!", good + "\n"]
    bad_values += [base64.b64encode(r).decode() for r in (raw[:16], raw[:-1], raw + b"x" * 16)]
    # a last byte that is no pad length (0), and a pad byte wrong but the last one plausible: strict PKCS#7 checks
    # every pad byte
    for plain in (b"0123456789abcde\0", b"0123456789abc\1\3\3"):
        bad_values.append(base64.b64encode(iv + AES.new(key, AES.MODE_CBC, iv).encrypt(plain)).decode())
    for bad in bad_values:
        with pytest.raises(SignatureError) as info:
            decrypt(bad, ENCRYPT_KEY)
        assert (info.value.status, info.value.reason) == (400, "decrypt"), bad


# --- whole requests, each also shown to the official SDK ------------------------------------------------------

def test_valid_signed_encrypted_event() -> None:
    plain = receive("om_1", chat_id="oc_9")
    headers, body = signed(plain)
    assert sdk_status(headers, body, "im.message.receive_v1") == 200
    event = event_of(headers, body)
    assert (event.schema, event.event_type, event.tenant_key) == ("2.0", "im.message.receive_v1", "tenant-1")
    assert event.key == "oc_9" and event.message_id == "om_1"
    assert event.dedup_keys("default") == (f"default\0event\0{event.event_id}", "default\0message\0om_1")
    assert event.headers("default") == [("event_type", b"im.message.receive_v1"),
                                        ("event_id", event.event_id.encode()), ("app", b"default"),
                                        ("tenant_key", b"tenant-1")]


def test_the_record_is_the_plaintext_minus_the_token_member_byte_for_byte() -> None:
    # v2: header.token (Feishu-like indented JSON with non-ASCII text: nothing else may change)
    plain = receive("om_1", chat_id="oc_9")
    member = f'"token": "{TOKEN}",\n  '.encode()
    assert plain.count(member) == 1
    assert event_of(*signed(plain)).record == plain.replace(member, b"")
    # v1: the top-level token; the event's own fields stay
    plain_v1 = v1("message", {"app_id": "cli_test", "open_chat_id": "oc_1", "text": "token"}, uuid="u-1")
    member_v1 = f'"token": "{TOKEN}", '.encode()
    assert plain_v1.count(member_v1) == 1
    assert event_of(*signed(plain_v1)).record == plain_v1.replace(member_v1, b"")


def test_a_card_callbacks_own_token_is_not_the_verification_token_and_stays() -> None:
    plain = v2("card.action.trigger", {"token": "c-card-token", "action": {"tag": "button"}})
    record = event_of(*signed(plain)).record
    decoded = json.loads(record)
    assert "token" not in decoded["header"] and decoded["event"]["token"] == "c-card-token"
    assert TOKEN.encode() not in record


@pytest.mark.parametrize(("text", "path", "expected"), [
    (b'{"a": 1, "token": "x", "b": 2}', ("token",), b'{"a": 1, "b": 2}'),
    (b'{"token": "x", "b": 2}', ("token",), b'{"b": 2}'),
    (b'{"a": 1, "token": "x"}', ("token",), b'{"a": 1}'),
    (b'{"token": "x"}', ("token",), b'{}'),
    (b'{ }', ("token",), b'{ }'),
    (b'{"a":{"token":1},"s":"\\"token\\": 2"}', ("token",), b'{"a":{"token":1},"s":"\\"token\\": 2"}'),
    (b'{"\\u0074oken": "x", "k": [1, {"t": "}"}]}', ("token",), b'{"k": [1, {"t": "}"}]}'),  # escaped key
    (b'{"token": 1, "a": 2, "token": 3}', ("token",), b'{"a": 2}'),  # repeated: all of them
    (b'{"a": 2, "token": 1, "token": 3}', ("token",), b'{"a": 2}'),
    (b'\n{"header" :\n {"token":"t" ,\n"x":-1.5e3}\n,"event":null}\n', ("header", "token"),
     b'\n{"header" :\n {"x":-1.5e3}\n,"event":null}\n'),
    (b'{"event": {"header": {"token": 1}}, "header": {"token": "t"}, "header": {"y": [], "token": "u"}}',
     ("header", "token"), b'{"event": {"header": {"token": 1}}, "header": {}, "header": {"y": []}}'),
    (b'{"header": "token", "token": "x"}', ("header", "token"), b'{"header": "token", "token": "x"}'),
])
def test_without_member_cuts_only_that_members_bytes(text: bytes, path: tuple[str, ...], expected: bytes) -> None:
    assert without_member(text, path) == expected
    json.loads(expected)


def test_the_shortcuts_cut_exactly_what_the_general_walk_cuts(monkeypatch: pytest.MonkeyPatch) -> None:
    import random

    rng = random.Random(7)
    separators = [", ", ",", " , ", ",\n  ", "\n,\t", "  ,  "]
    values = ['"v"', '""', "12", "-1.5e3", "true", "null", '"a:b,c}"', '"{not nested}"']
    docs = []
    for _ in range(400):
        members = [f'"k{i}"{rng.choice([":", ": ", " : "])}{rng.choice(values)}' for i in range(rng.randrange(0, 5))]
        members.insert(rng.randrange(len(members) + 1), f'"token"{rng.choice([":", ": "])}{rng.choice(values)}')
        inner = rng.choice(separators).join(members)
        header = "{" + rng.choice(["", " ", "\n "]) + inner + rng.choice(["", " ", "\n"]) + "}"
        ws = rng.choice(["", " ", "\n "])
        docs.append(rng.choice([  # Feishu's layout (the shortcut), and others (the general walk)
            f'{ws}{{{ws}"schema":{ws}"2.0",{ws}"header":{ws}{header}{ws},{ws}"event":{ws}{{"token": "card"}}{ws}}}{ws}',
            f'{{"header": {header}, "schema": "2.0", "event": {{"token": "card"}}}}',
            f'{{"schema": "2.0", "header": {header}, "event": {{"token": "card"}}, "extra": 1}}',
        ]).encode())
    fast = [without_token(doc, parse_envelope(doc)) for doc in docs]
    flat_only = [without_member(doc, ("header", "token")) for doc in docs]
    monkeypatch.setattr(relay.events, "_flat_cuts", lambda *args: None)  # the general walk only
    general = [without_member(doc, ("header", "token")) for doc in docs]
    assert fast == general and flat_only == general
    for doc, cut in zip(docs, fast, strict=True):
        expected = json.loads(doc)
        del expected["header"]["token"]
        assert json.loads(cut) == expected
        assert len(cut) < len(doc)


def test_without_member_is_fast_on_deep_and_long_values() -> None:
    # possessive patterns: a long run before a nested bracket does not backtrack (a quadratic or exponential
    # regex would take minutes here; this is a correctness check of the pattern, not a timing)
    deep = b'{"e": [' + b"1," * 100_000 + b'[2]], "s": "' + b'\\"x' * 100_000 + b'", "token": "t"}'
    assert without_member(deep, ("token",)) == deep.replace(b', "token": "t"', b"")


def test_v1_envelope() -> None:
    plain = v1("message", {"tenant_key": "t-v1", "open_chat_id": "oc_1", "app_id": "cli_test"}, uuid="u-1")
    headers, body = signed(plain)
    assert sdk_status(headers, body, "message") == 200
    event = event_of(headers, body)
    assert (event.schema, event.event_type, event.event_id, event.tenant_key) == ("1.0", "message", "u-1", "t-v1")
    assert event.key == "oc_1"


def test_challenge_plain_and_encrypted_need_no_signature() -> None:
    assert check({}, challenge("c1"), PLAIN_APP) == Challenge("c1")
    assert check({}, challenge("c2"), APP) == Challenge("c2")
    body = json.dumps({"encrypt": encrypt(challenge("c3"))}).encode()
    assert sdk_status({}, body, "x") == 200
    assert check({}, body) == Challenge("c3")
    assert reason({}, challenge("c4", token="wrong"), PLAIN_APP) == "token"
    assert reason({}, json.dumps({"encrypt": encrypt(challenge("c5", token="bad"))}).encode()) == "token"


def test_unsigned_app_checks_the_token() -> None:
    plain = receive("om_p")
    assert isinstance(check({}, plain, PLAIN_APP), Event)
    assert reason({}, receive("om_p", token="nope"), PLAIN_APP) == "token"
    assert reason({}, json.dumps({"encrypt": encrypt(plain)}).encode(), PLAIN_APP) == "no_encrypt_key"


def test_an_app_without_a_verification_token_accepts_nothing() -> None:
    open_app = AppConfig(name="open", app_id="cli_test", app_secret=Secret("s"))
    keyed = AppConfig(name="keyed", app_id="cli_test", app_secret=Secret("s"), encrypt_key=Secret(ENCRYPT_KEY))
    assert refusal({}, receive("om_o"), open_app) == (401, "token")
    assert refusal({}, challenge("c", token=""), open_app) == (401, "token")
    assert refusal(*signed(receive("om_o")), keyed) == (401, "token")


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


def _sign(body: bytes, timestamp: str = "1700000000", nonce: str = "n0nce") -> dict[str, str]:
    return {"X-Lark-Request-Timestamp": timestamp, "X-Lark-Request-Nonce": nonce,
            "X-Lark-Signature": signature(timestamp, nonce, ENCRYPT_KEY, body)}


@pytest.mark.parametrize("headers", [
    {**_sign(b"{}"), "X-Lark-Signature": "ab\udcff" + "0" * 61},  # a non-UTF-8 byte, as aiohttp decodes it
    {**_sign(b"{}"), "X-Lark-Request-Nonce": "n\udcc3\udca9"},
    {**_sign(b"{}"), "X-Lark-Request-Timestamp": "17\udcff"},
    {**_sign(b"{}"), "X-Lark-Request-Nonce": "caf\u00e9"},  # valid UTF-8, not ASCII
    {**_sign(b"{}"), "X-Lark-Request-Nonce": "line\nbreak"},
    {**_sign(b"{}"), "X-Lark-Request-Nonce": "n" * 257},
    {**_sign(b"{}"), "X-Lark-Request-Timestamp": "soon"},
    {**_sign(b"{}"), "X-Lark-Request-Timestamp": "-5"},
    {**_sign(b"{}"), "X-Lark-Signature": "ab" * 31},
    {**_sign(b"{}"), "X-Lark-Signature": "zz" * 32},
    {"X-Lark-Signature": "ab\udcff"},  # malformed even without the other two
])
def test_a_malformed_signature_header_is_a_4xx_not_a_500(headers: dict[str, str]) -> None:
    with pytest.raises(SignatureError) as info:
        read_signature_headers(CIMultiDict(headers))
    assert (info.value.status, info.value.reason) == (400, "header")


def test_a_repeated_signature_header_is_malformed_and_a_partial_set_is_unsigned() -> None:
    twice = CIMultiDict(_sign(b"{}"))
    twice.add("X-Lark-Signature", "0" * 64)
    with pytest.raises(SignatureError, match="header"):
        read_signature_headers(twice)
    partial = _sign(b"{}")
    del partial["X-Lark-Request-Nonce"]
    assert read_signature_headers(CIMultiDict(partial)) is None
    assert read_signature_headers(CIMultiDict()) is None


def test_every_crypto_failure_gets_the_same_answer() -> None:
    """Signed (only the key holder can ask) and unsigned: one answer each, whatever broke (no format oracle)."""
    good = base64.b64decode(encrypt(receive("om_d")))
    encrypted_values = {
        "bad base64": "%%%not-base64",
        "bad length": base64.b64encode(good[:-3]).decode(),
        "bad padding": base64.b64encode(good[:-16] + bytes(16)).decode(),
        "wrong key": encrypt(receive("om_d"), key="another key"),
        "not JSON after decryption": encrypt(b"not json at all"),
        "JSON but truncated": encrypt(b'{"schema": "2.0", "header": {'),
    }
    signed_answers, unsigned_answers = set(), set()
    for value in encrypted_values.values():
        body = json.dumps({"encrypt": value}).encode()
        signed_answers.add(refusal(sign_raw(body), body))
        unsigned_answers.add(refusal({}, body))
    assert signed_answers == {(400, "decrypt")}
    # unsigned: the same answer as for an unsigned valid event, or an unsigned challenge-shaped garbage
    unsigned_answers.add(refusal({}, json.dumps({"encrypt": encrypt(b'{"type": "url_verification"}')}).encode()))
    small_event = v2("x.y_v1", {}, event_id="e")
    assert len(json.dumps({"encrypt": encrypt(small_event)})) < CHALLENGE_MAX_BYTES
    unsigned_answers.add(refusal({}, json.dumps({"encrypt": encrypt(small_event)}).encode()))
    assert unsigned_answers == {(401, "signature")}


def test_an_unsigned_body_over_the_challenge_size_is_never_decrypted_or_parsed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_decrypt, real_parse = relay.events.decrypt, relay.events.parse_envelope

    def spy_decrypt(*args: Any) -> bytes:
        calls.append("decrypt")
        return real_decrypt(*args)

    def spy_parse(*args: Any) -> Any:
        calls.append("parse")
        return real_parse(*args)

    monkeypatch.setattr(relay.events, "decrypt", spy_decrypt)
    monkeypatch.setattr(relay.events, "parse_envelope", spy_parse)
    headers, body = signed(receive("om_big", chat_id="oc_" + "x" * 2000))
    assert len(body) > CHALLENGE_MAX_BYTES
    for bad_headers in ({}, {**headers, "X-Lark-Signature": "0" * 64}, sign_raw(body, key="another key")):
        assert refusal(bad_headers, body) == (401, "signature")
    assert calls == []
    assert isinstance(check(headers, body), Event) and calls == ["parse", "decrypt", "parse"]
    calls.clear()
    assert check({}, json.dumps({"encrypt": encrypt(challenge("c"))}).encode()) == Challenge("c")
    assert calls == ["parse", "decrypt", "parse"]  # a small unsigned body: decrypted to see it is a challenge


def test_decryption_errors_after_a_valid_signature() -> None:
    assert reason(*signed(b"not json at all")) == "decrypt"
    assert reason(*signed(b"[1, 2]")) == "envelope"
    assert reason(*signed(b'{"schema": "2.0", "header": {"event_type": "x"}}')) == "envelope"  # no event id
    assert reason(*signed(b'{"schema": "2.0", "header": {"event_id": 5, "event_type": "x"}}')) == "envelope"
    assert reason(sign_raw(b"<xml/>"), b"<xml/>") == "json"


@pytest.mark.parametrize("header", [
    {"event_type": "im.message.receive_v1\nINFO forged log line"},
    {"event_type": "im.message.receive_v1\r\nX-Injected: 1"},
    {"event_type": "im.message.receive_v1 "},
    {"event_type": "事件"},
    {"event_type": "x" * 257},
    {"event_id": "ev\x00id"},
    {"event_id": "ev id"},
])
def test_event_type_and_id_must_be_printable_ascii(header: dict[str, str]) -> None:
    fields = {"event_id": "ev-1", "event_type": "im.message.receive_v1", "token": TOKEN, "app_id": "cli_test",
              **header}
    plain = json.dumps({"schema": "2.0", "header": fields, "event": {}}).encode()
    assert refusal(*signed(plain)) == (400, "envelope")


def test_the_app_id_must_be_the_apps_own() -> None:
    # an event of app A posted to app B's URL with B's token and key: refused
    assert refusal(*signed(receive("om_a", app_id="cli_other"))) == (403, "app_id")
    no_app_id = json.dumps({"schema": "2.0", "header": {"event_id": "e", "event_type": "x", "token": TOKEN},
                            "event": {}}).encode()
    assert refusal(*signed(no_app_id)) == (403, "app_id")  # every v2 header names its app
    assert refusal(*signed(v1("message", {"app_id": "cli_other"}))) == (403, "app_id")
    assert isinstance(check(*signed(v1("message", {}))), Event)  # v1 types without app_id
    assert refusal({}, receive("om_a", app_id="cli_other"), PLAIN_APP) == (403, "app_id")
    wrong_token_too = receive("om_a", app_id="cli_other", token="t")
    assert refusal(*signed(wrong_token_too)) == (401, "token")  # the token is checked first


# --- the record key of every event type -------------------------------------------------------------------------

OPERATOR = {"open_id": "ou_1", "union_id": "on_1", "user_id": "u_1", "tenant_key": "tenant-1"}
USER_ID = {"open_id": "ou_1", "union_id": "on_1", "user_id": "u_1"}

# event type -> (event body, expected record key). Bodies follow the SDK's models (lark_oapi api/im/v1/model,
# event/callback/model) and docs/feishu-rules.md §6.6, §6.7. v1 types are marked "v1 <type>".
KEY_TABLE: dict[str, tuple[dict[str, Any], str]] = {
    # the IM events of docs/feishu-rules.md §6.7
    "im.message.receive_v1": ({"sender": {"sender_id": USER_ID, "sender_type": "user", "tenant_key": "t"},
                               "message": {"message_id": "om_rcv", "chat_id": "oc_rcv", "chat_type": "group",
                                           "message_type": "text", "content": "{\"text\":\"hi\"}"}}, "oc_rcv"),
    "im.message.message_read_v1": ({"reader": {"reader_id": USER_ID, "read_time": "1", "tenant_key": "t"},
                                    "message_id_list": ["om_read1", "om_read2"]}, "om_read1"),
    "im.message.recalled_v1": ({"message_id": "om_rec", "chat_id": "oc_rec", "recall_time": "1",
                                "recall_type": "message_owner"}, "oc_rec"),
    "im.message.reaction.created_v1": ({"message_id": "om_rx", "reaction_type": {"emoji_type": "SMILE"},
                                        "operator_type": "user", "user_id": USER_ID, "action_time": "1"}, "om_rx"),
    "im.message.reaction.deleted_v1": ({"message_id": "om_ry", "reaction_type": {"emoji_type": "OK"},
                                        "operator_type": "app", "app_id": "cli_1", "action_time": "1"}, "om_ry"),
    # callbacks
    "card.action.trigger": ({"operator": OPERATOR, "token": "c-1", "host": "im_message",
                             "action": {"value": {"k": "v"}, "tag": "button"},
                             "context": {"open_message_id": "om_card", "open_chat_id": "oc_card"}}, "oc_card"),
    "url.preview.get": ({"operator": OPERATOR, "host": "im_message",
                         "context": {"url": "https://example.com/x", "preview_token": "pt-1",
                                     "open_message_id": "om_prev", "open_chat_id": "oc_prev"}}, "oc_prev"),
    # chats
    "im.chat.updated_v1": ({"chat_id": "oc_upd", "operator_id": USER_ID, "external": False,
                            "after_change": {"name": "new"}, "before_change": {"name": "old"}}, "oc_upd"),
    "im.chat.disbanded_v1": ({"chat_id": "oc_dis", "operator_id": USER_ID, "external": False, "name": "n"},
                             "oc_dis"),
    "im.chat.member.user.added_v1": ({"chat_id": "oc_mem", "operator_id": USER_ID, "external": False,
                                      "users": [{"name": "n", "tenant_key": "t", "user_id": USER_ID}]}, "oc_mem"),
    "im.chat.member.bot.deleted_v1": ({"chat_id": "oc_bot", "operator_id": USER_ID, "external": False},
                                      "oc_bot"),
    "im.chat.access_event.bot_p2p_chat_entered_v1": ({"chat_id": "oc_p2p", "operator_id": USER_ID,
                                                      "last_message_id": "om_last"}, "oc_p2p"),
    # v1 envelopes
    "v1 message": ({"app_id": "cli_test", "open_chat_id": "oc_v1", "open_message_id": "om_v1", "msg_type": "text",
                    "text": "hi", "open_id": "ou_1"}, "oc_v1"),
    "v1 add_bot": ({"app_id": "cli_test", "open_chat_id": "oc_add", "chat_name": "n"}, "oc_add"),
    "v1 p2p_chat_create": ({"app_id": "cli_test", "chat_id": "oc_p2pv1", "user": {"open_id": "ou_1"}},
                           "oc_p2pv1"),
    # no chat, no message: the event id
    "contact.user.created_v3": ({"object": {"open_id": "ou_1", "name": "n"}}, "<event id>"),
}


@pytest.mark.parametrize("event_type", sorted(KEY_TABLE))
def test_record_key_by_event_type(event_type: str) -> None:
    body, expected = KEY_TABLE[event_type]
    if event_type.startswith("v1 "):
        plain = v1(event_type.removeprefix("v1 "), body, uuid="ev-key")
    else:
        plain = v2(event_type, body, event_id="ev-key")
    event = event_of(*signed(plain))
    assert event.key == ("ev-key" if expected == "<event id>" else expected)


def test_every_im_event_type_is_in_the_key_table() -> None:
    im_events = {"im.message.receive_v1", "im.message.message_read_v1", "im.message.recalled_v1",
                 "im.message.reaction.created_v1", "im.message.reaction.deleted_v1"}
    assert im_events <= set(KEY_TABLE)


@pytest.mark.parametrize(("body", "key"), [
    ({"context": {"open_message_id": "om_only"}}, "om_only"),  # a card without its chat: the message
    ({"context": {"url": "https://x", "preview_token": "p", "open_chat_id": "oc_top"}}, "oc_top"),  # top notice
    ({"message": {"message_id": "om_m", "chat_id": ""}}, "om_m"),  # an empty chat id counts as none
    ({"message": "a string, not an object", "chat_id": "oc_x"}, "ev-odd"),  # an unexpected shape: not refused
    ({"message_id_list": []}, "ev-odd"),
])
def test_record_key_rule_edge_cases(body: dict[str, Any], key: str) -> None:
    assert event_of(*signed(v2("card.action.trigger", body, event_id="ev-odd"))).key == key


# --- events pushed over the long connection (relay.ws) ----------------------------------------------------------

WS_APP = AppConfig(name="ws", app_id="cli_test", app_secret=Secret("s"))


def test_a_pushed_event_is_read_like_a_webhook_one_and_loses_its_token() -> None:
    plain = receive("om_1", chat_id="oc_9")
    for app in (WS_APP, PLAIN_APP, APP):  # no token configured, a token, a token and a key
        event = relay.events.verify_pushed(app, plain)
        assert event.key == "oc_9" and event.event_type == "im.message.receive_v1"
        assert TOKEN.encode() not in event.record
        assert event.record == relay.events.verify_request(PLAIN_APP, None, plain, time.time(), CFG).record


def test_a_pushed_event_checks_the_token_when_one_is_configured_and_always_the_app_id() -> None:
    with pytest.raises(SignatureError, match="token"):
        relay.events.verify_pushed(PLAIN_APP, receive("om_1", token="wrong"))
    assert relay.events.verify_pushed(WS_APP, receive("om_1", token="")).event_type == "im.message.receive_v1"
    for app in (WS_APP, PLAIN_APP):
        with pytest.raises(SignatureError, match="app_id"):
            relay.events.verify_pushed(app, receive("om_1", app_id="cli_other"))


def test_a_pushed_challenge_or_garbage_is_refused() -> None:
    with pytest.raises(SignatureError, match="envelope"):
        relay.events.verify_pushed(PLAIN_APP, challenge())
    with pytest.raises(SignatureError, match="json"):
        relay.events.verify_pushed(WS_APP, b"\x00not json")
    encrypted = json.dumps({"encrypt": encrypt(receive("om_2"))}).encode()
    assert relay.events.verify_pushed(APP, encrypted).message_id == "om_2"  # decrypted, as node-sdk does
