"""Log lines: JSON or text, and repeated lines summarised (one per interval, with the count)."""

from __future__ import annotations

import io
import json
import logging

from relay.logs import Repeats, configure, formatter, resolve


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def record(name: str, msg: str, *args: object, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_repeats_pass_the_first_then_one_per_interval_with_the_count() -> None:
    clock = Clock()
    repeats = Repeats(30.0, clock=clock)
    passed = []
    for second in range(90):  # an outage: aiokafka's error for every connection attempt, 10 a second
        clock.now = float(second)
        for node in range(10):
            r = record("aiokafka.conn", "Unable connect to node with id %s: %s", node, "refused")
            if repeats.filter(r):
                passed.append((second, r.getMessage(), getattr(r, "repeated", 0)))
    assert [(s, n) for s, _, n in passed] == [(0, 0), (30, 299), (60, 299)]
    assert passed[1][1] == "Unable connect to node with id 0: refused [and 299 more like it in 30s]"


def test_repeats_keep_templates_apart_and_leave_info_lines_alone() -> None:
    clock = Clock()
    repeats = Repeats(30.0, clock=clock)
    assert repeats.filter(record("aiokafka.conn", "a %s", 1))
    assert repeats.filter(record("aiokafka.client", "a %s", 1))  # another logger: its own window
    assert repeats.filter(record("aiokafka.conn", "b %s", 1))  # another template
    assert not repeats.filter(record("aiokafka.conn", "a %s", 2))
    assert repeats.filter(record("aiokafka.conn", "x", level=logging.INFO))  # every aiokafka line counts...
    assert not repeats.filter(record("aiokafka.conn", "x", level=logging.INFO))
    for _ in range(3):  # ...but the relay's own INFO lines (one per finished intent) are never dropped
        assert repeats.filter(record("relay.outbound", "finished %s", 1, level=logging.INFO))
    assert repeats.filter(record("relay.outbound", "commit failed", level=logging.WARNING))  # its WARNINGs are
    assert not repeats.filter(record("relay.outbound", "commit failed", level=logging.WARNING))
    for event_id in ("e1", "e2"):  # except a line about one record: its id is what an operator needs
        lost = record("relay.inbound", "%s LOST", event_id)
        lost.event_id = event_id
        assert repeats.filter(lost)


def test_json_lines_carry_the_bound_fields() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter("json"))
    logger = logging.getLogger("relay.test_logs")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("retrying %s", "im.message.create", extra={"app": "default", "attempts": 2, "reason": "x"})
    finally:
        logger.removeHandler(handler)
    line = json.loads(out.getvalue())
    assert line["message"] == "retrying im.message.create" and line["level"] == "WARNING"
    assert line["logger"] == "relay.test_logs" and line["app"] == "default" and line["attempts"] == 2
    assert "time" in line and out.getvalue().count("\n") == 1


def test_auto_is_json_unless_a_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert resolve("auto", io.StringIO()) == "json" and resolve("auto", Tty()) == "text"
    assert resolve("text", io.StringIO()) == "text" and resolve("json", Tty()) == "json"


def test_configure_replaces_its_own_handler() -> None:
    root = logging.getLogger()
    level, before = root.level, list(root.handlers)
    try:
        first, second = io.StringIO(), io.StringIO()
        configure("INFO", "json", stream=first)
        configure("INFO", "text", stream=second)
        logging.getLogger("relay.test_logs_configure").info("hello %s", "there")
        assert first.getvalue() == "" and second.getvalue().endswith("INFO relay.test_logs_configure hello there\n")
    finally:
        for handler in root.handlers[:]:
            if handler not in before:
                root.removeHandler(handler)
        root.setLevel(level)
