"""The warehouse's errors: each message names the file and the fix."""

from __future__ import annotations


class WarehouseError(ValueError):
    """Something in the warehouse directory is wrong; the message names the file and the fix."""


class ReadOnlyError(WarehouseError):
    """A statement given to the read-only SQL entry point would write or reach outside."""
