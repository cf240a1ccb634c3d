"""The one error type every loader raises: it always names the scan and the reason."""

from __future__ import annotations

from os import PathLike


class ScanReadError(ValueError):
    """A scan that cannot be read, with the file (or series folder) and the reason."""

    def __init__(self, path: str | PathLike | None, reason: str) -> None:
        self.path = None if path is None else str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}" if self.path else reason)
