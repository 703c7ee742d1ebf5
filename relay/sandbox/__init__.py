"""A local stand-in for the Feishu Open Platform, strict about every documented limit (the tests' referee).

    server    the aiohttp server: tokens, the APIs the relay calls, limits, faults, the call log, /_sandbox
    bodies    the request bodies it accepts, each documented rule in the type
    cards     CardKit card entities: sequence per card, uuid, streaming mode and its 10 minutes, elements
    uploads   image and file uploads: multipart fields, sizes, types, the keys made
    store     store apps: app_tickets pushed to the event URL, resend, app and tenant tokens
    windows   exact sliding-window counting ("at most N calls in any T seconds"), the way Feishu states limits
    emit      sample events, encrypted and signed as Feishu sends them, posted to a webhook (``relay sandbox emit``)
    ws        the long connection (WebSocket event mode): endpoint, handshake, pings, fragments, redelivery
    callbacks how Feishu judges a callback's answer: 3 s, the answer shapes, 200671 / 200673
"""

from relay.sandbox.server import (
    AFTER_FAULTS,
    ALL_FAULTS,
    BEFORE_FAULTS,
    ApiThrottle,
    CallRecord,
    Control,
    FaultKind,
    FaultSettings,
    Message,
    Sandbox,
    SandboxOptions,
    SandboxUser,
    TargetFailure,
    TargetThrottle,
    TenantToken,
    serve,
)
from relay.sandbox.store import SandboxStoreApp
from relay.sandbox.ws import Delivery, LongConnections, WsOptions

__all__ = [
    "AFTER_FAULTS",
    "ALL_FAULTS",
    "BEFORE_FAULTS",
    "ApiThrottle",
    "CallRecord",
    "Control",
    "Delivery",
    "FaultKind",
    "FaultSettings",
    "LongConnections",
    "Message",
    "Sandbox",
    "SandboxOptions",
    "SandboxStoreApp",
    "SandboxUser",
    "TargetFailure",
    "TargetThrottle",
    "TenantToken",
    "WsOptions",
    "serve",
]
