"""feishu-relay: Kafka intents -> Feishu Open API, Feishu events -> Kafka.

The tree is the architecture (leaves first):

    errors           the one root error, with a ``retriable`` flag
    config           the TOML config, env overrides, secrets masked
    intents          the intent union (msgspec, tagged on ``kind``) and the result record
    limits           token buckets sized for Feishu's counting windows
    calls            intent -> Feishu HTTP call (path, body, which limits apply)
    outcomes         one pure function classifying every Feishu answer
    backoff          jittered exponential backoff and the retry budget
    offsets          per-partition commit bookkeeping
    feishu           the HTTP client: pooled session, tenant tokens, one refresh in flight
    outbound         the consumer: keyed lanes, limits, retries, results, dead letters, commits
    preview_planner  which url_preview calls to make and which intent each finishes (pure)
    preview_memory   the 5-second memory of preview updates, in a compacted Kafka topic
    previews         url_preview.update coalescing under the 1-per-5-s token rule (the async shell)
    events           inbound crypto, signatures, envelopes and typed event views
    inbound          the webhook server: verify, publish, dedup, answer
    sandbox_bodies   the Feishu request bodies the sandbox accepts, each documented rule in the type
    sandbox          a local stand-in for the Feishu Open Platform
    app              wiring and lifetime (imported only by __main__)
"""

__version__ = "0.1.0"
