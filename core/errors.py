"""The one exception root of streamrec and the few subclasses that mean something.

Agents never let these escape for a single bad event: a bad event becomes a
dead-letter record (see ``core.events.DeadLetter``). These exceptions are for
start-up and infrastructure failures, and for the decoders to say *why*.
"""


class StreamrecError(Exception):
    """Root of every error raised on purpose by streamrec."""


class ConfigError(StreamrecError):
    """A setting is missing or invalid; the message says what to fix."""


class DecodeError(StreamrecError):
    """An event could not be decoded or validated.

    ``reason`` is a short machine-readable code (e.g. ``bad_json``) used as the
    dead-letter reason and metric label; the message is the human detail.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class ModelLoadError(StreamrecError):
    """A model artefact is missing, corrupt or incompatible."""


class StoreUnavailableError(StreamrecError):
    """The vector store cannot be reached or refused an operation."""


class StoreInUseError(StoreUnavailableError):
    """An embedded store folder is open in another process: it has one owner at a time."""
