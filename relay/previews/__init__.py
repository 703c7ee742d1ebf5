"""URL-preview updates under Feishu's one-update-per-5-s token rule, across replicas and owners: one concept in
four parts.

    planner    which batch_update calls to make and which intent each finishes (pure, injected time)
    claims     which claim on a token wins, the same for every replica reading the memory (pure)
    memory     every replica's claims, in a compacted Kafka topic stamped by the broker, followed live
    coalescer  the async shell: ``enqueue`` an intent, await its result; one loop plans and performs calls,
               each attempt claiming its tokens first and stamped at the instant it is sent
"""

from relay.previews.claims import ClaimArbiter
from relay.previews.coalescer import PreviewCoalescer, PreviewResult, PreviewsStopped, PreviewTicket
from relay.previews.memory import MEMORY_TOPIC_CONFIG, Claim, KafkaPreviewMemory, PreviewMemory
from relay.previews.planner import PreviewPlanner

__all__ = [
    "MEMORY_TOPIC_CONFIG",
    "Claim",
    "ClaimArbiter",
    "KafkaPreviewMemory",
    "PreviewCoalescer",
    "PreviewMemory",
    "PreviewPlanner",
    "PreviewResult",
    "PreviewTicket",
    "PreviewsStopped",
]
