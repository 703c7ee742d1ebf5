"""Feishu's long connection (WebSocket event mode): events without a public URL, answered once Kafka holds them.

    frames    the ``pbbp2.Frame`` protobuf codec (pure)
    protocol  the endpoint answer, handshake refusals, reconnect delays, the liveness watchdog, fragment
              reassembly and answers, as values and plain functions (pure)
    client    one app's connection over aiohttp, publishing through the webhook's path (relay.inbound)

An app is served this way with ``inbound.mode = "websocket"`` in its ``[[apps]]`` entry (docs/events.md).
"""

from relay.ws.client import LongConnection, PushedEvents

__all__ = ["LongConnection", "PushedEvents"]
