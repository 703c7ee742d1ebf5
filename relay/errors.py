"""The relay's errors: one root with a ``retriable`` flag.

    RelayError                 retriable = False unless a subclass says otherwise
    ├── ConfigError            the config file or an env override is wrong (names the key)
    ├── IntentError            an intent record cannot be performed as written (names the field)
    ├── SignatureError         an inbound request failed verification (short reason, no body)
    └── ListenError            a server cannot listen on its address (``http: 127.0.0.1:8080 is in use``)

Expected outcomes of a Feishu call (throttled, refused, token expired) are *values* (see
``outcomes``), not exceptions; these errors are for what a caller cannot branch around.
"""

from __future__ import annotations

import errno
from typing import ClassVar


class RelayError(Exception):
    """Root of every error the relay raises on purpose."""

    retriable: ClassVar[bool] = False


class ConfigError(RelayError):
    """A bad config: the message is one line naming the key and why."""

    def __init__(self, key: str, why: str) -> None:
        super().__init__(f"{key}: {why}" if key else why)
        self.key = key
        self.why = why


class IntentError(RelayError):
    """An intent that is not valid JSON, names an unknown kind or breaks a field rule."""

    def __init__(self, reason: str, *, error: str = "invalid", id: str | None = None,
                 kind: str | None = None, app: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error  # dead-letter ``relay.error``: "decode" or "invalid"
        self.id = id
        self.kind = kind
        self.app = app


class SignatureError(RelayError):
    """An inbound request failed a check; ``status`` is the HTTP status to answer."""

    def __init__(self, reason: str, status: int = 401) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class ListenError(RelayError):
    """A server (``what``: ``http``, ``sandbox``) cannot listen on ``host:port``; one line naming both."""

    def __init__(self, what: str, host: str, port: int, err: OSError) -> None:
        if err.errno == errno.EADDRINUSE:
            super().__init__(f"{what}: {host}:{port} is in use")
        else:
            super().__init__(f"{what}: cannot listen on {host}:{port}: {err.strerror or err}")
