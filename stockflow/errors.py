"""The one error hierarchy. Every message says what was wrong and what to do about it."""


class StockflowError(Exception):
    """Root of every error stockflow raises on purpose."""


class InvalidCommand(StockflowError):
    """A command breaks a rule of the contract (empty SKU, qty <= 0, ...)."""


class DecodeError(StockflowError):
    """Bytes on a topic are not a message this version of stockflow can read."""


class StackError(StockflowError):
    """The local Kafka/Redis stack could not be installed, started or reached."""


class Overloaded(StockflowError):
    """The pipeline is behind; the caller should retry after ``retry_after_ms``."""

    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms
