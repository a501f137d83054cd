"""The exceptions hal raises. Every message names the op, the argument, what was expected and
what arrived, so that the fix can be read off the message."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["HALError", "BackendUnavailable", "Unsupported", "InvalidInput", "OutOfBlocks"]


class HALError(Exception):
    """Base class of every error hal raises on purpose."""


class _WithReasons(HALError):
    def __init__(self, message: str, reasons: Iterable[str] = ()) -> None:
        self.reasons: list[str] = list(reasons)
        text = message
        if self.reasons:
            text += "".join(f"\n  - {r}" for r in self.reasons)
        super().__init__(text)


class BackendUnavailable(_WithReasons):
    """The named backend cannot run on this machine (missing hardware, driver or package)."""


class Unsupported(_WithReasons):
    """The backend runs here but does not declare what was asked (a dtype, head dim, feature...)."""


class InvalidInput(HALError, ValueError):
    """An argument has the wrong shape, dtype, device or value. Nothing was changed."""


class OutOfBlocks(HALError):
    """The block manager has too few free blocks for the request. Its state is unchanged."""
