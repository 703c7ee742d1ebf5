"""URL-preview updates under Feishu's one-update-per-5-s token rule: one concept in three parts.

    planner    which batch_update calls to make and which intent each finishes (pure, injected time)
    memory     "token T was last updated at t", durable in a compacted Kafka topic
    coalescer  the async shell: ``submit`` an intent, await its result; one loop plans and performs calls
"""

from relay.previews.coalescer import PreviewCoalescer, PreviewResult, PreviewsStopped
from relay.previews.memory import MEMORY_TOPIC_CONFIG, KafkaPreviewMemory, PreviewMemory
from relay.previews.planner import PreviewPlanner

__all__ = [
    "MEMORY_TOPIC_CONFIG",
    "KafkaPreviewMemory",
    "PreviewCoalescer",
    "PreviewMemory",
    "PreviewPlanner",
    "PreviewResult",
    "PreviewsStopped",
]
