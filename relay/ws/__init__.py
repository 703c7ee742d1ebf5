"""Feishu's long connection (WebSocket event mode): events without a public URL, answered once Kafka holds them.

    frames    the ``pbbp2.Frame`` protobuf codec (pure)
