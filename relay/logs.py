"""How the relay's log lines look and how often a repeated one is written; only the entry point calls this.

**Format.** ``json``: one JSON object per line (``time``, ``level``, ``logger``, ``message``, and the fields a
line binds with ``extra=``: e.g. ``intent_id``, ``kind``, ``app``, ``status``, ``attempts``, ``latency_ms``),
for a log pipeline to index without parsing prose. ``text``: ``time level logger message``, for a terminal.
``auto`` (the default) is ``json`` unless stderr is a terminal. The JSON is python-json-logger's formatter, a
plain :class:`logging.Formatter`, so every module keeps ``logging.getLogger(__name__)``.

**Repeats.** A broker outage makes aiokafka log the same connection error for every connection attempt of every
client (thousands of lines a minute), which buries the lines that matter. :class:`Repeats` lets the first line
of each (logger, message template) through, drops the same template for ``repeat_interval`` seconds while
counting, and lets the next one after the interval through with the count (``repeated``: how many were dropped,
``[and 812 more like it in 30s]`` in the text). It applies to every aiokafka line and to every WARNING or worse,
except a line about one record (it binds ``intent_id`` or ``event_id``, e.g. a callback answered but lost): a
relay INFO line (one per finished intent, one per inbound request) and a record's own trouble are never dropped.
The count of a burst that stops is written with the template's next line (a filter sees no time pass by itself).
"""

from __future__ import annotations

import logging
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final, Literal, TextIO

from pythonjsonlogger.json import JsonFormatter

LogFormat = Literal["auto", "json", "text"]

TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s %(message)s"
# fields that name one record: a line binding one is about that record, not a repeat of the same trouble
RECORD_IDS: Final = ("intent_id", "event_id")
# the remembered templates; each is a (logger, format string) pair, so a few hundred cover any outage
MAX_TEMPLATES: Final = 512


class Repeats(logging.Filter):
    """Drops a line whose (logger, template) was let through less than ``interval`` seconds ago (module doc)."""

    def __init__(self, interval: float, *, clock: Callable[[], float] = time.monotonic,
                 always: tuple[str, ...] = ("aiokafka",)) -> None:
        super().__init__()
        self.interval = interval
        self._clock = clock
        self._always = always
        self._windows: OrderedDict[tuple[str, str], list[float]] = OrderedDict()  # -> [window start, dropped]

    def _applies(self, record: logging.LogRecord) -> bool:
        if any(record.name == name or record.name.startswith(name + ".") for name in self._always):
            return True
        # a line about one record (it binds the record's id) is never dropped: its id is what an operator needs
        return record.levelno >= logging.WARNING and not any(hasattr(record, key) for key in RECORD_IDS)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._applies(record):
            return True
        key = (record.name, str(record.msg))
        now = self._clock()
        window = self._windows.get(key)
        if window is not None and now - window[0] < self.interval:
            window[1] += 1
            return False
        if window is not None and window[1]:
            dropped, since = int(window[1]), now - window[0]
            # appended to the template, before the record's args are applied: no "%" in what is added
            record.msg = f"{record.msg} [and {dropped} more like it in {since:.0f}s]"
            record.repeated = dropped
        self._windows[key] = [now, 0]
        self._windows.move_to_end(key)
        while len(self._windows) > MAX_TEMPLATES:
            self._windows.popitem(last=False)
        return True


def formatter(fmt: Literal["json", "text"]) -> logging.Formatter:
    if fmt == "text":
        return logging.Formatter(TEXT_FORMAT)
    return JsonFormatter("{asctime}{levelname}{name}{message}", style="{",
                         rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                         json_ensure_ascii=False)


def resolve(fmt: LogFormat, stream: TextIO) -> Literal["json", "text"]:
    """``auto``: JSON unless ``stream`` is a terminal."""
    if fmt != "auto":
        return fmt
    isatty = getattr(stream, "isatty", None)
    return "text" if isatty is not None and isatty() else "json"


_installed: logging.Handler | None = None


def configure(level: str | int = "INFO", fmt: LogFormat = "auto", *, repeat_interval: float = 30.0,
              stream: TextIO | None = None) -> None:
    """Log to ``stream`` (stderr) at ``level`` in ``fmt``; again later (once the config is read) replaces it."""
    global _installed
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter(resolve(fmt, stream)))
    handler.addFilter(Repeats(repeat_interval))
    root = logging.getLogger()
    if _installed is not None:
        root.removeHandler(_installed)
    root.addHandler(handler)
    _installed = handler
    root.setLevel(level.upper() if isinstance(level, str) else level)
    # group and metadata chatter is not the relay's records; DEBUG shows it
    logging.getLogger("aiokafka").setLevel(logging.NOTSET if root.level <= logging.DEBUG else logging.WARNING)
