"""The engine's exception hierarchy: one root, one subclass per kind of failure."""

from __future__ import annotations


class EngineError(Exception):
    """Root of every error Kairos raises on purpose."""


class ConfigError(EngineError):
    """A setting or configuration file is invalid."""


class EventError(EngineError):
    """An event or a batch of events cannot be decoded or validated."""


class PayloadTooLargeError(EventError):
    """A request holds more than a limit allows (``engine.limits``); nothing of it is taken."""


class DocumentError(EngineError):
    """A configuration document (rules, offer catalog) is invalid.

    ``problems`` holds every problem found, each already naming file, id and field, so a
    user fixes them all in one pass.
    """

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        self.problems = problems or [message]
        super().__init__(message if problems is None else "\n".join(self.problems))


class RuleError(DocumentError):
    """A rule file, rule or expression is invalid."""


class CatalogError(DocumentError):
    """An offer catalog (its offers, eligibility expressions or contact policy) is invalid."""


class StateError(EngineError):
    """A snapshot cannot be written or restored."""


class WorkerLostError(EngineError):
    """A worker of the engine (a shard, a sink) died or cannot be reached: the engine recovers
    from its CURRENT checkpoint and the source is replayed from the checkpoint's position."""


class StretchFailedError(WorkerLostError):
    """The engine raised in the middle of a stretch read from its source (a call that timed
    out, a bug on one shard): what it holds is unknown, so it recovers like a lost worker and
    the stretch is read again, instead of being skipped."""


class SourceError(EngineError):
    """A source cannot be read, or is not the one a checkpoint was taken of."""
