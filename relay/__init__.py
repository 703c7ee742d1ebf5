"""feishu-relay: Kafka intents -> Feishu Open API, Feishu events -> Kafka.

The tree is the architecture (leaves first):

    errors           the one root error, with a ``retriable`` flag
    config           the TOML config, env overrides, secrets masked
    intents          the intent union (msgspec, tagged on ``kind``)
    buckets          pure limit arithmetic: Feishu's windows, bucket sizing, the token bucket, the send log
    targets          which chat a per-target name counts in, learnt from Feishu's answers (bounded)
    shares           pure share arithmetic: every replica derives the same split of the quota from one log
    limits           the limiter: per-target then app-wide buckets, awaited before every call, voided by a 429
    media            what Feishu refuses of an upload (size, image type), checked before it is made
    calls            intent -> Feishu HTTP call (path, body, which limits apply); CardKit sequences from offsets
    outcomes         one pure function classifying every Feishu answer; how a call ended
    results          the result record and the dead letter written for each intent; ``relay schema``
    metrics          one prometheus-client registry per relay; label values chosen by the relay, never a producer
    backoff          jittered exponential backoff and the retry budget
    offsets          per-partition commit bookkeeping
    tickets          store apps' app_tickets: the latest per app, in a compacted topic every replica follows
    feishu           the HTTP client: pooled session, tenant tokens (store apps: per tenant), one refresh in flight
    executor         one call to its end: limits, attempts, token refresh, retries, expiry
    journal          the write-ahead journal of calls not safe to repeat: none repeated across a kill
    folding          latest wins: a card.stream (or opted-in card.patch) a later waiting update replaces
    fetch            downloading an upload's url with an SSRF guard (public addresses only, pinned)
    previews/        url_preview.update under the 1-per-5-s token rule, across replicas: planner and claims
                     (pure), memory (Kafka, followed live), coalescer
    membership       the group-membership lease: no Feishu call or result once the partitions may be lost
    coordination     the replicas' beats on a compacted topic: quota shares, throttles told to the others
    outbound         the consumer: keyed lanes, limits, retries, results, dead letters, commits
    events           inbound crypto, signatures, envelopes and typed event views
    dedup            the inbound seen-set
    answers          the answers Feishu takes to callbacks (toast, card, inline preview), checked (pure)
    replies          callbacks answered by services: request–reply over Kafka, correlation, the reply reader
    seenlog          the seen-set shared by replicas and restarts through a compacted topic
    inbound          the webhook server: verify, publish, dedup, answer
    ws/              Feishu's long connection (WebSocket event mode): frame codec, protocol rules (pure),
                     the client that publishes through inbound's path
    sandbox/         a local stand-in for the Feishu Open Platform: server, request bodies, sliding windows,
                     the long connection, sample events and Feishu's verdict on a callback's answer
    kafka            aiokafka clients built from the config, topic creation
    readiness        ``/healthz``, ``/readyz`` (broker answering, tokens obtainable, parts alive), ``/metrics``
    logs             JSON or text log lines; repeated aiokafka lines and warnings summarised (entry point only)
    preflight        ``relay check``'s warnings and ``--connect`` probes (broker, each app's token)
    asyncapi         the AsyncAPI 3.0 document of the topics, built from the types (``relay asyncapi``)
    client           a producer for Python services: typed intents, the right key, results awaited
    responder        the callback side for Python services: read callbacks, call a function, write the reply
    app              wiring and lifetime (imported only by __main__)
"""

__version__ = "0.1.0"
