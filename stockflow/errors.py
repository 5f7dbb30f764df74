"""The one error hierarchy. Every message says what was wrong and what to do about it."""


class StockflowError(Exception):
    """Root of every error stockflow raises on purpose."""


class InvalidCommand(StockflowError):
    """A command breaks a rule of the contract (empty SKU, qty <= 0, ...)."""


class DecodeError(StockflowError):
    """Bytes on a topic are not a message this version of stockflow can read."""


class StackError(StockflowError):
    """The local Kafka/Redis stack could not be installed, started or reached."""
