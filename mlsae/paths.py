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


def default_warehouse_location() -> str:
    """$MLSAE_HOME if set, else ./mlsae-data, as given (a path or, for reading, a URL)."""
    return os.environ.get("MLSAE_HOME") or "mlsae-data"


def default_warehouse() -> Path:
    """The default warehouse as a local directory (what commands that write use);
    WarehouseError when $MLSAE_HOME is a URL."""
    from mlsae.warehouse.layout import check_local  # the one place that says what --out may be

    return check_local(default_warehouse_location())
