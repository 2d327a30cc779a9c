"""Where the embedded assets and the default warehouse live."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
EMBEDDED_DIR = PACKAGE_DIR / "embedded"
EMBEDDED_MODEL_DIR = EMBEDDED_DIR / "model"
EMBEDDED_CORPUS_DIR = EMBEDDED_DIR / "corpus"
EMBEDDED_LENS_DIR = EMBEDDED_DIR / "lens"
# sql/ sits beside the package in a checkout (editable install, the supported way).
SQL_DIR = PACKAGE_DIR.parent / "sql"

EMBEDDED_MODEL_NAME = "embedded"
EMBEDDED_CORPUS_NAME = "embedded"
# The embedded model family: same recipe and tokenizer at other shapes (the report's
# model-size axis); `--model embedded-4x128` is mlsae/embedded/family/4x128.
EMBEDDED_FAMILY_DIR = EMBEDDED_DIR / "family"
EMBEDDED_FAMILY = ("embedded-4x128", "embedded-8x288")


def embedded_model_dir(name: object) -> Path | None:
    """The directory of an embedded model name ("embedded", "embedded-4x128", ...), else None."""
    text = str(name)
    if text == EMBEDDED_MODEL_NAME:
        return EMBEDDED_MODEL_DIR
    if text in EMBEDDED_FAMILY:
        return EMBEDDED_FAMILY_DIR / text.removeprefix(EMBEDDED_MODEL_NAME + "-")
    return None


def default_warehouse_location() -> str:
    """$MLSAE_HOME if set, else ./mlsae-data, as given (a path or, for reading, a URL)."""
    return os.environ.get("MLSAE_HOME") or "mlsae-data"


def default_warehouse() -> Path:
    """The default warehouse as a local directory (what commands that write use);
    WarehouseError when $MLSAE_HOME is a URL."""
    from mlsae.warehouse.layout import check_local  # the one place that says what --out may be

    return check_local(default_warehouse_location())
