"""The topics a worker reads and writes, named from settings."""
from __future__ import annotations

from dataclasses import dataclass

import faust

from core.settings import Settings


@dataclass(frozen=True)
class Topics:
    clicks: faust.TopicT
    searches: faust.TopicT
    images: faust.TopicT
    catalog: faust.TopicT
    requests: faust.TopicT
    responses: faust.TopicT
    deadletter: faust.TopicT
    model_updates: faust.TopicT

    @classmethod
    def declare(cls, app: faust.App, settings: Settings) -> "Topics":
        # Values stay raw bytes: decoding is ours (core.events.decode), so a
        # bad message becomes a dead letter instead of a deserializer crash.
        def topic(key: str) -> faust.TopicT:
            return app.topic(
                settings.topic(key),
                key_type=bytes,
                value_type=bytes,
                key_serializer="raw",
                value_serializer="raw",
                partitions=settings.partitions,
            )

        return cls(**{key: topic(key) for key in cls.__dataclass_fields__})
