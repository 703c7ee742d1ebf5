"""The AsyncAPI 3.0 document of the relay's topics, built from the msgspec types (``relay asyncapi``).

The relay is the application the document describes: it *receives* intents and callback replies and *sends*
results, dead letters, events and callbacks. Every payload schema comes from the structs that decode or encode
the records (:mod:`relay.intents`, :mod:`relay.results`, :mod:`relay.answers`), so the document cannot drift
from the code; the structs below only describe what the relay writes without decoding it (record headers, the
Feishu envelopes it forwards as bytes).

``docs/asyncapi.json`` is this document as ``relay asyncapi`` prints it; a test checks that the checked-in file is
current and that it validates against the official AsyncAPI 3.0.0 JSON Schema. The examples (one per intent kind)
are the ones ``docs/intents.md`` shows; a test checks both agree and that each decodes.

Two adjustments to msgspec's JSON Schema output, both for AsyncAPI's Schema Object (a superset of JSON Schema
draft 07): references point into ``#/components/schemas``, and the OpenAPI-style ``discriminator`` object on the
intent union becomes a ``oneOf`` (AsyncAPI's ``discriminator`` is a property *name* whose values must be schema
names, which ``kind`` values are not; each member already pins ``kind`` to its one value).
"""

from __future__ import annotations

from typing import Any, Final, Literal

import msgspec

from relay import __version__
from relay.answers import CardActionAnswer, PreviewAnswer
from relay.config import KafkaConfig
from relay.intents import Intent
from relay.results import DeadLetterError, Result

# One example per intent kind, in the order of the ``Intent`` union.
EXAMPLES: Final[dict[str, dict[str, Any]]] = {
    "message.send": {"kind": "message.send", "id": "n-1", "receive_id_type": "chat_id", "receive_id": "oc_1",
                     "msg_type": "text", "content": {"text": "hi"}},
    "message.reply": {"kind": "message.reply", "id": "n-2", "message_id": "om_1", "chat_id": "oc_1",
                      "msg_type": "text", "content": {"text": "ok"}, "reply_in_thread": False},
    "message.edit": {"kind": "message.edit", "id": "n-3", "message_id": "om_1", "msg_type": "text",
                     "content": {"text": "edited"}},
    "message.recall": {"kind": "message.recall", "id": "n-4", "message_id": "om_1"},
    "message.forward": {"kind": "message.forward", "id": "n-5", "message_id": "om_1", "receive_id_type": "open_id",
                        "receive_id": "ou_1"},
    "card.patch": {"kind": "card.patch", "id": "n-6", "message_id": "om_2",
                   "content": {"config": {"update_multi": True}, "elements": []}},
    "message.urgent": {"kind": "message.urgent", "id": "n-7", "message_id": "om_1", "channel": "app",
                       "user_id_type": "open_id", "user_id_list": ["ou_1"]},
    "reaction.add": {"kind": "reaction.add", "id": "n-8", "message_id": "om_1", "emoji_type": "THUMBSUP"},
    "reaction.remove": {"kind": "reaction.remove", "id": "n-9", "message_id": "om_1", "reaction_id": "r_1"},
    "pin.add": {"kind": "pin.add", "id": "n-10", "message_id": "om_1"},
    "pin.remove": {"kind": "pin.remove", "id": "n-11", "message_id": "om_1"},
    "card.delay_update": {"kind": "card.delay_update", "id": "n-12", "token": "c-xxx",
                          "card": {"open_ids": ["ou_1"], "elements": []}},
    "ephemeral.send": {"kind": "ephemeral.send", "id": "n-13", "chat_id": "oc_1", "open_id": "ou_1",
                       "card": {"elements": []}},
    "ephemeral.delete": {"kind": "ephemeral.delete", "id": "n-14", "message_id": "om_e"},
    "url_preview.update": {"kind": "url_preview.update", "id": "n-15", "preview_tokens": ["952te0c8-9ccf"],
                           "open_ids": ["ou_1"]},
    "chat_button.update": {"kind": "chat_button.update", "id": "n-16", "chat_id": "oc_1", "user_id_type": "open_id",
                           "user_ids": ["ou_1"],
                           "buttons": {"buttons": [{"action_type": "url_page", "text": {"text": "Open"},
                                                    "multi_url": {"url": "https://example.com/"},
                                                    "button_type": "primary"}]}},
    "message.batch_send": {"kind": "message.batch_send", "id": "n-17", "msg_type": "text",
                           "content": {"text": "notice"}, "open_ids": ["ou_1", "ou_2"]},
    "card.create": {"kind": "card.create", "id": "n-19",
                    "card": {"schema": "2.0", "config": {"streaming_mode": True, "summary": {"content": "..."}},
                             "body": {"elements": [{"tag": "markdown", "element_id": "answer", "content": ""}]}}},
    "card.send": {"kind": "card.send", "id": "n-20", "receive_id_type": "chat_id", "receive_id": "oc_1",
                  "card_id": "7355372766134157313"},
    "card.stream": {"kind": "card.stream", "id": "n-21", "card_id": "7355372766134157313", "element_id": "answer",
                    "content": "The answer so far"},
    "card.settings": {"kind": "card.settings", "id": "n-22", "card_id": "7355372766134157313",
                      "settings": {"config": {"streaming_mode": True}}},
    "card.update": {"kind": "card.update", "id": "n-23", "card_id": "7355372766134157313",
                    "card": {"schema": "2.0", "body": {"elements": [{"tag": "markdown", "content": "Done."}]}}},
    "card.finish": {"kind": "card.finish", "id": "n-24", "card_id": "7355372766134157313",
                    "summary": "The answer"},
    "image.upload": {"kind": "image.upload", "id": "n-25", "image_type": "message",
                     "data": "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
                             "+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="},
    "file.upload": {"kind": "file.upload", "id": "n-26", "file_type": "pdf", "file_name": "report.pdf",
                    "data": "JVBERi0xLjQKMSAwIG9iaiA8PC9UeXBlL0NhdGFsb2c+PiBlbmRvYmoK"
                             "dHJhaWxlciA8PC9Sb290IDEgMCBSPj4KJSVFT0YK"},
    "api.call": {"kind": "api.call", "id": "n-18", "method": "GET",
                 "path": "/open-apis/im/v1/messages/:message_id/read_users", "path_params": {"message_id": "om_1"},
                 "query": {"user_id_type": "open_id"}, "rate": {"per_second": 50, "per_minute": 1000}},
}

# The record key each kind is ordered by (``relay.intents.ordering_key``), as a producer reads it off the intent.
RECORD_KEYS: Final[dict[str, str]] = {
    "message.send": "receive_id", "message.reply": "message_id", "message.edit": "message_id",
    "message.recall": "message_id", "message.forward": "receive_id", "card.patch": "message_id",
    "message.urgent": "message_id", "reaction.add": "message_id", "reaction.remove": "message_id",
    "pin.add": "message_id", "pin.remove": "message_id", "card.delay_update": "token",
    "ephemeral.send": "chat_id", "ephemeral.delete": "message_id", "url_preview.update": "preview_tokens[0]",
    "chat_button.update": "chat_id", "message.batch_send": "id",
    "card.create": "id", "card.send": "receive_id", "card.stream": "card_id", "card.settings": "card_id",
    "card.update": "card_id", "card.finish": "card_id", "image.upload": "id", "file.upload": "id",
    "api.call": "path with path_params filled in",
}
# kinds whose key is always their card_id: order_key is refused (their sequence comes from the partition's order)
FIXED_KEYS: Final = frozenset({"card.stream", "card.settings", "card.update", "card.finish"})


# --- record headers and forwarded envelopes (described here; the relay writes them without a struct) ----------


class IntentHeaders(msgspec.Struct):
    """Headers the relay reads from an intent record (all optional; others are ignored)."""

    traceparent: str | None = msgspec.field(default=None)


class ResultHeaders(msgspec.Struct):
    """Headers of a result record: the intent's ``traceparent`` and each header named in
    ``kafka.forward_headers``, copied unchanged."""

    traceparent: str | None = None


class DeadLetterHeaders(msgspec.Struct):
    """Headers of a dead letter; the intent record's own headers follow, unchanged."""

    error: DeadLetterError = msgspec.field(name="relay.error")
    reason: str = msgspec.field(name="relay.reason")
    source_topic: str = msgspec.field(name="relay.source.topic")
    source_partition: str = msgspec.field(name="relay.source.partition")  # decimal, as header values are bytes
    source_offset: str = msgspec.field(name="relay.source.offset")


class EventHeaders(msgspec.Struct):
    """Headers of an event or callback record."""

    event_type: str
    event_id: str
    app: str
    tenant_key: str | None = None


class CallbackHeaders(msgspec.Struct):
    """Headers of a callback record: an event's, and the request–reply headers (``inbound.callback_replies``)."""

    event_type: str
    event_id: str
    app: str
    tenant_key: str | None = None
    correlation_id: str | None = msgspec.field(default=None, name="relay.correlation_id")
    reply_topic: str | None = msgspec.field(default=None, name="relay.reply_topic")
    reply_deadline: str | None = msgspec.field(default=None, name="relay.reply_deadline")  # Unix ms, decimal


class ReplyHeaders(msgspec.Struct):
    """Headers of a reply record (the key is the correlation id too)."""

    correlation_id: str = msgspec.field(name="relay.correlation_id")


class EventHeader(msgspec.Struct):
    """``header`` of a schema 2.0 envelope (Feishu may add fields)."""

    event_id: str
    event_type: str
    create_time: str | None = None
    token: str | None = None
    app_id: str | None = None
    tenant_key: str | None = None


class FeishuEventV2(msgspec.Struct):
    """A schema 2.0 event or callback, the plaintext bytes Feishu sent (decrypted, never re-encoded)."""

    schema: Literal["2.0"]
    header: EventHeader
    event: dict[str, Any]


class FeishuEventV1Body(msgspec.Struct):
    type: str
    tenant_key: str | None = None


class FeishuEventV1(msgspec.Struct):
    """A schema 1.0 event (``event.type`` names it, ``uuid`` identifies it)."""

    uuid: str
    type: Literal["event_callback"]
    event: FeishuEventV1Body
    ts: str | None = None
    token: str | None = None


_REF: Final = "#/components/schemas/{name}"


def _asyncapi_schema(node: Any) -> Any:
    """msgspec's schema as an AsyncAPI Schema Object: the discriminated ``anyOf`` becomes a plain ``oneOf``."""
    if isinstance(node, list):
        return [_asyncapi_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _asyncapi_schema(value) for key, value in node.items() if key != "discriminator"}
    if "discriminator" in node and "anyOf" in out:
        out["oneOf"] = out.pop("anyOf")
    return out


def _schemas() -> dict[str, Any]:
    types = (Intent, Result, IntentHeaders, ResultHeaders, DeadLetterHeaders, EventHeaders, FeishuEventV2,
             FeishuEventV1, CallbackHeaders, ReplyHeaders, CardActionAnswer, PreviewAnswer)
    (intent, *_), components = msgspec.json.schema_components(types, ref_template=_REF)
    # msgspec unions only tagged structs; the two envelopes are told apart by ``schema`` / ``type`` instead
    event = {"oneOf": [_ref("FeishuEventV2"), _ref("FeishuEventV1")]}
    # an answer is read by the callback's event type (relay.answers), not by a tag of its own
    answer = {"description": "the JSON Feishu takes as the answer to the callback: CardActionAnswer for "
                             "card.action.trigger, PreviewAnswer for url.preview.get, any object otherwise",
              "anyOf": [_ref("CardActionAnswer"), _ref("PreviewAnswer"), {"type": "object"}]}
    schemas: dict[str, Any] = _asyncapi_schema({**components, "Intent": intent, "FeishuEvent": event,
                                                "CallbackAnswer": answer})
    return schemas


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _kafka_key(description: str) -> dict[str, Any]:
    return {"kafka": {"key": {"type": "string", "description": description}, "bindingVersion": "0.5.0"}}


def _intent_messages(schemas: dict[str, Any]) -> dict[str, Any]:
    messages: dict[str, Any] = {}
    for member in schemas["Intent"]["oneOf"]:
        name = member["$ref"].rsplit("/", 1)[1]
        kind = schemas[name]["properties"]["kind"]["enum"][0]
        messages[kind] = {
            "name": kind,
            "title": f"{kind} intent",
            "summary": schemas[name].get("description", "").split("\n")[0],
            "contentType": "application/json",
            "headers": _ref("IntentHeaders"),
            "payload": _ref(name),
            "bindings": _kafka_key(f"the ordering key: {RECORD_KEYS[kind]} " + (
                "(always: order_key is refused, the sequence comes from the partition's order)" if kind in FIXED_KEYS
                else "(order_key when the intent gives one)")),
            "examples": [{"name": kind, "payload": EXAMPLES[kind]}],
        }
    return messages


def document(kafka: KafkaConfig | None = None) -> dict[str, Any]:
    """The whole AsyncAPI 3.0.0 document, topic names from ``kafka`` (the defaults when None)."""
    k = kafka or KafkaConfig()
    schemas = _schemas()
    intents = _intent_messages(schemas)
    result_example = {
        "id": "n-1", "kind": "message.send", "app": "default", "status": "ok", "superseded_by": None, "code": 0,
        "msg": "success", "data": {"message_id": "om_dc13264520392913993dd051dba21dcf"}, "http_status": 200,
        "attempts": 1, "log_id": "202612011200000000000000000000000", "received_at": "2026-12-01T12:00:00.000000Z",
        "finished_at": "2026-12-01T12:00:00.084000Z"}
    event_bindings = _kafka_key("chat_id when the event has one, else message_id, else the event id")
    topics = {
        "intents": (k.intents_topics[0], "kafka.intents_topics",
                    "Intents from producers: one JSON object per record, tagged by kind.", intents),
        "results": (k.results_topic, "kafka.results_topic", "Exactly one result record per intent.", {
            "result": {"name": "result", "title": "Result", "contentType": "application/json",
                       "headers": _ref("ResultHeaders"), "payload": _ref("Result"),
                       "correlationId": {"location": "$message.payload#/id"},
                       "bindings": _kafka_key("the intent's id"),
                       "examples": [{"name": "ok", "payload": result_example}]}}),
        "deadLetters": (k.dead_letter_topic, "kafka.dead_letter_topic",
                        "Every rejected or failed intent: the original value and key, unchanged.", {
            "deadLetter": {"name": "deadLetter", "title": "Dead letter",
                           "headers": _ref("DeadLetterHeaders"),
                           "payload": {"description": "the intent record's value, byte for byte (it may not even "
                                                      "be JSON: relay.error = decode)"},
                           "bindings": _kafka_key("the intent record's key, unchanged")}}),
        "events": (k.events_topic, "kafka.events_topic (and inbound.routes per event type)",
                   "Verified Feishu events, as Feishu sent them.", {
            "event": {"name": "event", "title": "Feishu event", "contentType": "application/json",
                      "headers": _ref("EventHeaders"), "payload": _ref("FeishuEvent"),
                      "correlationId": {"location": "$message.header#/event_id"}, "bindings": event_bindings}}),
        "callbacks": (k.callbacks_topic, "kafka.callbacks_topic",
                      "Callbacks Feishu wants answered (inbound.callback_types): the relay answers Feishu with the "
                      "reply a service writes to the topic in relay.reply_topic by relay.reply_deadline, else with "
                      "its fallback.", {
            "callback": {"name": "callback", "title": "Feishu callback", "contentType": "application/json",
                         "headers": _ref("CallbackHeaders"), "payload": _ref("FeishuEvent"),
                         "correlationId": {"location": "$message.header#/relay.correlation_id"},
                         "bindings": event_bindings}}),
        "replies": (k.replies_topic, "kafka.replies_topic",
                    "Services' answers to callbacks; every relay replica reads every partition.", {
            "reply": {"name": "reply", "title": "Callback reply", "contentType": "application/json",
                      "headers": _ref("ReplyHeaders"), "payload": _ref("CallbackAnswer"),
                      "correlationId": {"location": "$message.header#/relay.correlation_id"},
                      "bindings": _kafka_key("the callback's relay.correlation_id"),
                      "examples": [{"name": "toast", "payload": {"toast": {"type": "success",
                                                                           "content": "Approved"}}}]}}),
    }
    channels = {
        name: {"address": address, "title": address, "description": f"{about} Config key: {key}.",
               "messages": messages}
        for name, (address, key, about, messages) in topics.items()
    }

    def refs(channel: str) -> list[dict[str, str]]:
        return [{"$ref": f"#/channels/{channel}/messages/{m}"} for m in channels[channel]["messages"]]

    operations = {
        "receiveIntents": {"action": "receive", "channel": {"$ref": "#/channels/intents"},
                           "summary": "Perform each intent against the Feishu Open API",
                           "messages": refs("intents"),
                           "reply": {"channel": {"$ref": "#/channels/results"}, "messages": refs("results")}},
        "sendResults": {"action": "send", "channel": {"$ref": "#/channels/results"}, "messages": refs("results")},
        "sendDeadLetters": {"action": "send", "channel": {"$ref": "#/channels/deadLetters"},
                            "messages": refs("deadLetters")},
        "sendEvents": {"action": "send", "channel": {"$ref": "#/channels/events"}, "messages": refs("events")},
        "sendCallbacks": {"action": "send", "channel": {"$ref": "#/channels/callbacks"},
                          "summary": "Publish each callback and wait for a service's answer",
                          "messages": refs("callbacks"),
                          "reply": {"address": {"location": "$message.header#/relay.reply_topic"},
                                    "channel": {"$ref": "#/channels/replies"}, "messages": refs("replies")}},
        "receiveReplies": {"action": "receive", "channel": {"$ref": "#/channels/replies"},
                           "summary": "Answer Feishu's callback with the reply whose correlation id it carries",
                           "messages": refs("replies")},
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "feishu-relay",
            "version": __version__,
            "description": "Kafka <-> Feishu (Lark) Open Platform relay. Topic names are the defaults; each is a "
                           "config key (docs/config.md). Generated by `relay asyncapi` from the relay's own types.",
            "license": {"name": "Apache-2.0"},
        },
        "defaultContentType": "application/json",
        "servers": {"kafka": {"host": k.bootstrap_servers, "protocol": "kafka",
                              "description": "kafka.bootstrap_servers"}},
        "channels": channels,
        "operations": operations,
        "components": {"schemas": schemas},
    }


def render(kafka: KafkaConfig | None = None) -> str:
    """The document as ``docs/asyncapi.json`` holds it (stable order, two-space indent, trailing newline)."""
    return msgspec.json.format(msgspec.json.encode(document(kafka)), indent=2).decode() + "\n"
