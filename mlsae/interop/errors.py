"""The one error type of mlsae.interop."""

from __future__ import annotations


class InteropError(ValueError):
    """A file to import or export is missing, damaged or does not fit; the message names the
    file, what is wrong and the fix. Raised before anything is written."""
