"""The app_ticket book: the latest ticket per app from the tickets topic's records, waiters woken, drops."""

from __future__ import annotations

import asyncio

import msgspec

from relay.sandbox.store import ticket_event
from relay.tickets import TicketBook, read_ticket


def record(app_id: str, ticket: str) -> bytes:
    event = ticket_event(app_id, ticket, "v-token")
    del event["token"]  # the inbound side publishes the event minus its verification token
    return msgspec.json.encode(event)


def test_a_ticket_event_is_read_and_anything_else_is_not() -> None:
    assert read_ticket(record("cli_1", "tk-1")) == ("cli_1", "tk-1")
    other = msgspec.json.encode({"type": "event_callback", "event": {"type": "app_open", "app_id": "cli_1"}})
    for value in (b"", b"[]", b"not json", other, msgspec.json.encode({"event": {"type": "app_ticket"}})):
        assert read_ticket(value) is None


def test_the_latest_record_per_app_wins_and_a_tombstone_or_garbage_changes_nothing() -> None:
    book = TicketBook()
    book.apply(b"cli_1", record("cli_1", "tk-1"))
    book.apply(b"cli_2", record("cli_2", "tk-a"))
    book.apply(b"cli_1", record("cli_1", "tk-2"))
    book.apply(b"cli_1", None)
    book.apply(b"cli_1", b"{garbage")
    assert (book.get("cli_1"), book.get("cli_2"), book.get("cli_3")) == ("tk-2", "tk-a", None)


def test_drop_forgets_only_the_ticket_called_invalid() -> None:
    book = TicketBook()
    book.put("cli_1", "tk-1")
    book.put("cli_1", "tk-2")  # a newer one arrived meanwhile
    book.drop("cli_1", "tk-1")
    assert book.get("cli_1") == "tk-2"
    book.drop("cli_1", "tk-2")
    assert book.get("cli_1") is None


async def test_a_waiter_is_woken_by_the_next_ticket_or_times_out() -> None:
    book = TicketBook()
    waiting = asyncio.ensure_future(book.wait("cli_1", 5.0))
    await asyncio.sleep(0)
    book.put("cli_1", "tk-1")
    assert await waiting == "tk-1"
    assert await book.wait("cli_1", 0.0) == "tk-1"  # there is one: at once
    assert await book.wait("cli_2", 0.01) is None
