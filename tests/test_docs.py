"""docs/: every example validates (against ``relay schema``, the AsyncAPI document and the decoders), a broken
one is rejected, every config block is a valid config, and no link leaves the repository."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest

from relay.asyncapi import EXAMPLES, document
from relay.config import parse_config
from relay.errors import IntentError
from relay.intents import decode_intent
from relay.results import Result, schema

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [*DOCS, ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "tests" / "data" / "README.md"]
BLOCK = re.compile(r"^```(?P<info>[^\n]*)\n(?P<body>.*?)^```$", re.DOTALL | re.MULTILINE)
TAGS = ("Intent", "Result", "DeadLetterHeaders", "EventHeaders", "FeishuEvent", "CallbackHeaders", "ReplyHeaders",
        "CallbackAnswer")


def blocks(language: str) -> list[tuple[str, str, str]]:
    """(page, tag, body) of every fenced block of ``language`` in docs/ (the tag is the info string's 2nd word)."""
    found = []
    for page in DOCS:
        for match in BLOCK.finditer(page.read_text()):
            words = match["info"].split()
            if words and words[0] == language:
                found.append((page.name, words[1] if len(words) > 1 else "", match["body"]))
    return found


def examples() -> list[tuple[str, str, Any]]:
    out = []
    for page, tag, body in blocks("json"):
        for line in body.strip().splitlines():
            out.append((page, tag, json.loads(line)))
    return out


@functools.cache
def relay_schema_validator(name: str) -> jsonschema.Draft202012Validator:
    """``relay schema``: its root for an intent, ``$defs.<name>`` for anything else."""
    root = schema()
    target = root if name == "Intent" else {**root, "$ref": f"#/$defs/{name}"}
    return jsonschema.Draft202012Validator(target)


@functools.cache
def asyncapi_validator(name: str) -> jsonschema.Draft7Validator:
    """The AsyncAPI document's ``components.schemas.<name>`` (a draft-07 Schema Object)."""
    return jsonschema.Draft7Validator({"$ref": f"#/components/schemas/{name}", **document()})


def test_every_json_block_is_tagged_with_what_it_shows() -> None:
    tagged = blocks("json")
    assert tagged, "no examples found in docs/"
    assert [(page, tag) for page, tag, _ in tagged if tag not in TAGS] == []


@pytest.mark.parametrize(("page", "tag", "example"), examples(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_example_validates(page: str, tag: str, example: Any) -> None:
    assert list(asyncapi_validator(tag).iter_errors(example)) == [], (page, tag)
    if tag in ("Intent", "Result"):
        assert list(relay_schema_validator(tag).iter_errors(example)) == [], (page, tag)
    raw = json.dumps(example).encode()
    if tag == "Intent":
        decode_intent(raw)
    if tag == "Result":
        msgspec.json.decode(raw, type=Result)


def test_the_intent_examples_are_one_per_kind_and_the_asyncapi_ones() -> None:
    shown = [example for page, tag, example in examples() if tag == "Intent" and page == "intents.md"]
    assert shown == list(EXAMPLES.values())


def broken(example: dict[str, Any]) -> list[dict[str, Any]]:
    """Ways to break an intent: an unknown field, a wrong kind, a missing id, a field of the wrong type."""
    first_field = next(k for k in example if k not in ("kind", "id"))
    return [{**example, "colour": "red"}, {**example, "kind": "message.sned"},
            {k: v for k, v in example.items() if k != "id"}, {**example, first_field: 12345}]


@pytest.mark.parametrize("example", list(EXAMPLES.values()), ids=list(EXAMPLES))
def test_a_broken_intent_is_rejected_by_every_schema(example: dict[str, Any]) -> None:
    for bad in broken(example):
        assert not relay_schema_validator("Intent").is_valid(bad), bad
        assert not asyncapi_validator("Intent").is_valid(bad), bad
        with pytest.raises(IntentError):
            decode_intent(json.dumps(bad).encode())


def test_a_broken_result_is_rejected() -> None:
    result = next(example for _, tag, example in examples() if tag == "Result")
    for bad in ({**result, "status": "done"}, {k: v for k, v in result.items() if k != "received_at"}):
        assert not relay_schema_validator("Result").is_valid(bad)
        assert not asyncapi_validator("Result").is_valid(bad)


@pytest.mark.parametrize(("page", "body"), [(p, b) for p, _, b in blocks("toml")])
def test_every_config_block_is_a_valid_config(page: str, body: str) -> None:
    import tomllib

    parse_config(tomllib.loads(body), env={})


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but ``-`` and ``_`` dropped, spaces to hyphens."""
    return "".join(c for c in heading.strip().lower() if c.isalnum() or c in " -_").replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_link_leaves_the_repository_and_every_link_resolves(page: Path) -> None:
    text = page.read_text()
    for forbidden in ("../shared", "/work/shared", "feishu-facts", "feishu-next", "SPEC.md", "seeds/"):
        assert forbidden not in text, (page.name, forbidden)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        assert not re.match(r"^[a-z]+:", target), (page.name, target)  # no http(s):, mailto:, file:
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path) if path else page
        assert resolved.exists(), (page.name, target)
        if anchor and resolved.suffix == ".md":
            headings = [slug(h) for h in re.findall(r"^#+ (.*)$", resolved.read_text(), re.MULTILINE)]
            assert anchor in headings, (page.name, target)


def test_no_source_file_cites_a_file_users_do_not_have() -> None:
    """Docstrings and comments cite the repository's docs (docs/feishu-rules.md, docs/intents.md, ...), never the
    notes this project was started from, which no user has."""
    forbidden = re.compile(r"\.\./shared|/work/shared|feishu-facts|feishu-next|SPEC\.md|\bseeds/|facts §")
    found = []
    for folder in ("relay", "tests", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name == "test_docs.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if forbidden.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert found == [], "\n".join(found)
