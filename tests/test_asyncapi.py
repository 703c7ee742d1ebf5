"""The AsyncAPI document: valid AsyncAPI 3.0.0, current with the code, one message per intent kind."""

from __future__ import annotations

import copy
import functools
import json
import typing
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest
from referencing import Registry
from referencing.jsonschema import DRAFT7

from relay.asyncapi import EXAMPLES, RECORD_KEYS, document, render
from relay.intents import Intent, decode_intent, ordering_key

ROOT = Path(__file__).resolve().parent.parent
CHECKED_IN = ROOT / "docs" / "asyncapi.json"
ASYNCAPI_SCHEMA = ROOT / "tests" / "data" / "asyncapi-3.0.0.json"


@functools.cache
def asyncapi_validator() -> jsonschema.Draft7Validator:
    """The official AsyncAPI 3.0.0 schema (tests/data/README.md), its bundled ``$id``s resolved locally."""
    schema = json.loads(ASYNCAPI_SCHEMA.read_text())
    registry: Registry[Any] = Registry().with_resource(schema["$id"], DRAFT7.create_resource(schema)).crawl()
    return jsonschema.Draft7Validator(schema, registry=registry)


def test_the_checked_in_document_is_current() -> None:
    assert CHECKED_IN.read_text() == render(), "docs/asyncapi.json is stale: run `relay asyncapi > docs/asyncapi.json`"


def test_the_document_is_valid_asyncapi_3() -> None:
    errors = [f"{list(e.absolute_path)}: {e.message[:200]}" for e in asyncapi_validator().iter_errors(document())]
    assert errors == []


@pytest.mark.parametrize(
    "breakage",
    [
        lambda d: d.pop("info"),
        lambda d: d["operations"]["sendResults"].update(action="publish"),
        lambda d: d["channels"]["results"]["messages"]["result"].update(correlationId={"location": "payload.id"}),
        lambda d: d["channels"]["intents"].update(address=7),
    ],
)
def test_a_broken_document_is_rejected(breakage: Any) -> None:
    broken = copy.deepcopy(document())
    breakage(broken)
    assert not asyncapi_validator().is_valid(broken)


def test_one_message_per_intent_kind_with_its_example_and_key() -> None:
    kinds = [member.__struct_config__.tag for member in typing.get_args(Intent)]
    messages = document()["channels"]["intents"]["messages"]
    assert list(messages) == kinds == list(EXAMPLES) == list(RECORD_KEYS)
    for kind in kinds:
        intent = decode_intent(msgspec.json.encode(EXAMPLES[kind]))
        assert intent.__struct_config__.tag == kind
        field = RECORD_KEYS[kind]
        if kind == "api.call":
            continue  # "the filled path" is prose; checked below
        name, _, index = field.partition("[")
        value = getattr(intent, name)
        expected = value[int(index.rstrip("]"))] if index else value
        assert ordering_key(intent) == expected, kind
    call = decode_intent(msgspec.json.encode(EXAMPLES["api.call"]))
    assert ordering_key(call) == "/open-apis/im/v1/messages/om_1/read_users"


def test_topic_names_follow_the_config() -> None:
    from relay.config import parse_config

    kafka = parse_config({"kafka": {"results_topic": "team.results"}}, env={}).kafka
    assert document(kafka)["channels"]["results"]["address"] == "team.results"
