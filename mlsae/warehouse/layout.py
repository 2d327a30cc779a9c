"""Where everything lives in a warehouse: the one module that joins paths under it.

    <warehouse>/.mlsae-warehouse                 marker (init_warehouse)
    <warehouse>/<table>/sae_id=<id>/...parquet   tables (saes, layer_metrics, tokens, latents,
                                                 and the per-part sums)
    <warehouse>/setup.sql                        the views for the plain duckdb CLI
    <warehouse>/activations/<cache key>/         activation caches
    <warehouse>/autoencoders/<sae_id>/           training runs: checkpoint.pt, sae/, summary
    <warehouse>/lenses/                          trained tuned lenses
    <warehouse>/logging/sae_id=<id>/             latent-logging manifests
    <warehouse>/figures/<model>/                 figures
    <warehouse>/report/<model>/                  reports
    <warehouse>/.prefect/results/                Prefect's task results (the step cache)
    <warehouse>/.tmp/                            files being written, and the trash

A warehouse at a URL (s3://bucket/prefix) has the same layout in the bucket, plus

    <warehouse>/.commits/<unit>.json             what makes a unit of files visible
    <warehouse>/.leases/<name>.json              who is writing an autoencoder now

and is written through a local working copy (scratch_dir: the activation caches stay
there, unless shared: Budget.shared_cache), whose finished units mlsae.warehouse.remote
publishes.

Every other module asks this one for a location instead of joining paths itself.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from mlsae.warehouse.errors import WarehouseError
from mlsae.warehouse.tables import PART_SUM_TABLES, TABLE_SPECS, TABLES, check_sae_id

SETUP_SQL = "setup.sql"
ACTIVATIONS_DIR = "activations"
LENSES_DIR = "lenses"
LOGGING_DIR = "logging"
FIGURES_DIR = "figures"
REPORT_DIR = "report"
RESULTS_DIR = ".prefect/results"


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")


def is_url(where: object) -> bool:
    """True for a URL (s3://bucket/prefix, gs://..., memory://...) or a path object over one."""
    return type(where).__module__.startswith("upath") or bool(_URL.match(str(where)))


def check_local(where: str | os.PathLike) -> Path:
    """`where` as a local path, for what works on local files only (init_warehouse, the
    plain-duckdb setup script); WarehouseError for a URL, which would otherwise become
    a local directory named like the scheme (`s3:`) without a word."""
    if is_url(where):
        raise WarehouseError(
            f"{str(where)!r} is a URL, but this step works on a local directory only: the "
            "mlsae commands and flows take a bucket URL as --out / out / $MLSAE_HOME and work "
            "in its local working copy ($MLSAE_SCRATCH); from Python, pass "
            "mlsae.warehouse.working_dir(url) here; nothing was written")
    return Path(where)


def check_writable(where: str | os.PathLike) -> None:
    """Raise WarehouseError, naming the package to install, if `where` is a URL whose
    filesystem is not installed; a local path always passes (it is created later)."""
    if is_url(where):
        warehouse_location(where)


def warehouse_location(where: str | os.PathLike) -> Any:
    """Where a warehouse is read from: a resolved local Path, or for a URL a universal path
    over fsspec (s3:// through s3fs, with the standard AWS settings: AWS_ENDPOINT_URL,
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, ~/.aws)."""
    if not is_url(where):
        return Path(where).expanduser().resolve()
    if type(where).__module__.startswith("upath"):
        return where
    try:
        from upath import UPath

        location = UPath(str(where))
        location.fs  # noqa: B018  (the filesystem's package is imported here, not mid-query)
        return location
    except (ImportError, ValueError) as err:
        scheme = str(where).split(":", 1)[0]
        need = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}
        raise WarehouseError(
            f"warehouse {str(where)!r} needs universal-pathlib and "
            f"{need.get(scheme, 'the fsspec filesystem for ' + scheme + '://')}: pip install "
            f"'mlsae[s3]' (or that package) ({err})") from err


def _root(warehouse_dir: Any) -> Any:
    """A warehouse argument as a path object: Path, or a universal path for a URL."""
    return warehouse_location(warehouse_dir) if is_url(warehouse_dir) else Path(warehouse_dir)


def table_dir(warehouse_dir: str | os.PathLike, table: str) -> Path:
    if table not in TABLE_SPECS:
        raise ValueError(f"unknown table {table!r}: one of {TABLES}")
    return _root(warehouse_dir) / table


def partition_dir(warehouse_dir: str | os.PathLike, table: str, sae_id: str) -> Path:
    """<warehouse>/<table>/sae_id=<id>: the only directory that SAE's rows of `table` live in."""
    return table_dir(warehouse_dir, table) / f"sae_id={check_sae_id(sae_id)}"


def part_path(warehouse_dir: str | os.PathLike, table: str, sae_id: str, part: int) -> Path:
    return partition_dir(warehouse_dir, table, sae_id) / f"part-{part:05d}.parquet"


def table_glob(warehouse_dir: str | os.PathLike, table: str) -> str:
    return str(table_dir(warehouse_dir, table) / "*" / "*.parquet")


AUTOENCODERS_DIR = "autoencoders"


def activation_cache_dir(warehouse_dir: str | os.PathLike, key: str) -> Path:
    """Where the activation cache with this key (mlsae.extract.cache_key) lives: in the
    warehouse, or for a URL in this worker's working copy (uploaded only with
    Budget.shared_cache: mlsae.warehouse.workspace.sharing_activation_cache)."""
    return working_dir(warehouse_dir) / ACTIVATIONS_DIR / key


def activation_cache_prefix(key: str) -> str:
    """An activation cache's directory relative to the warehouse (its objects' prefix in a
    bucket, when the cache is shared)."""
    if not key or "/" in key or key.startswith("."):
        raise ValueError(f"activation cache key {key!r}: a directory name (extract.cache_key)")
    return f"{ACTIVATIONS_DIR}/{key}/"


def activation_caches(warehouse_dir: str | os.PathLike) -> list[Path]:
    """Every activation cache directory of the warehouse (of its working copy, for a URL)."""
    root = working_dir(warehouse_dir) / ACTIVATIONS_DIR
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def autoencoder_dirs(warehouse_dir: str | os.PathLike) -> list[Path]:
    """Every autoencoder (training run) directory of the warehouse."""
    root = _root(warehouse_dir) / AUTOENCODERS_DIR
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def trash_dir(warehouse_dir: str | os.PathLike) -> Path:
    """Where directories go to be deleted: moved here first (one rename), so a kill
    mid-delete never leaves a half-deleted directory where a reader looks."""
    return Path(warehouse_dir) / ".tmp" / "trash"


def lenses_dir(warehouse_dir: str | os.PathLike) -> Path:
    """Where tuned lenses trained for this warehouse's runs are kept (by model)."""
    return _root(warehouse_dir) / LENSES_DIR


def logging_dir(warehouse_dir: str | os.PathLike, sae_id: str) -> Path:
    """<warehouse>/logging/sae_id=<id>: the latent-logging run's manifest and lock."""
    return _root(warehouse_dir) / LOGGING_DIR / f"sae_id={check_sae_id(sae_id)}"


def figures_dir(warehouse_dir: str | os.PathLike, model_slug: str | None = None) -> Path:
    """A model's figures (None: the figures across models, e.g. a sweep's)."""
    root = _root(warehouse_dir) / FIGURES_DIR
    return root / model_slug if model_slug else root


def report_dir(warehouse_dir: str | os.PathLike, model_slug: str) -> Path:
    """A model's generated report (report.md and its figures)."""
    return _root(warehouse_dir) / REPORT_DIR / model_slug


REPORT_FILE = "report.md"


def report_prefix(model_slug: str) -> str:
    """A model's report directory relative to the warehouse (what a worker pulls from the
    bucket before rewriting the report: its ledger of runs)."""
    return f"{REPORT_DIR}/{model_slug}/"


def report_key(model_slug: str) -> str:
    """A model's report.md relative to the warehouse (its object in a bucket)."""
    return report_prefix(model_slug) + REPORT_FILE


def figures_prefix(model_slug: str | None = None) -> str:
    """A model's figures directory relative to the warehouse (None: every figure)."""
    return f"{FIGURES_DIR}/{model_slug}/" if model_slug else f"{FIGURES_DIR}/"


def report_file(warehouse_dir: str | os.PathLike, model_slug: str) -> Path:
    """A model's report.md."""
    return report_dir(warehouse_dir, model_slug) / REPORT_FILE


def results_dir(warehouse_dir: str | os.PathLike) -> Path | str:
    """Prefect's persisted task results for this warehouse: the step cache. For a URL the
    URL of that prefix in the bucket, so every worker shares it."""
    if is_url(warehouse_dir):
        return f"{warehouse_url(warehouse_dir)}/{RESULTS_DIR}"
    return Path(warehouse_dir).resolve() / RESULTS_DIR


def scratch_results_dir(warehouse_dir: str | os.PathLike) -> Path:
    """The step cache of what stays on this worker (the activation cache's extraction):
    a cached result must live where its output lives, or another worker would skip a
    step whose files it does not have."""
    return working_dir(warehouse_dir) / RESULTS_DIR


def setup_sql_path(warehouse_dir: str | os.PathLike) -> Path:
    return _root(warehouse_dir) / SETUP_SQL


def autoencoder_dir(warehouse_dir: str | os.PathLike, sae_id: str) -> Path:
    """<warehouse>/autoencoders/<id>: one autoencoder's training run (checkpoints) and its
    saved weights in sae/ (MLSAE.from_pretrained). Not <warehouse>/saes: that is the table."""
    return _root(warehouse_dir) / AUTOENCODERS_DIR / check_sae_id(sae_id)


TRAINED_WEIGHTS_DIR = "sae"
"""Inside autoencoder_dir: the trained weights (config.json + model.safetensors), written
when training finishes (mlsae.sae.train.SAE_DIR is the same name)."""


def trained_weights_dir(warehouse_dir: str | os.PathLike, sae_id: str) -> Path:
    """<warehouse>/autoencoders/<id>/sae: the finished autoencoder's weights."""
    return autoencoder_dir(warehouse_dir, sae_id) / TRAINED_WEIGHTS_DIR


# --------------------------------------------------------------------------- is it a warehouse?

WAREHOUSE_MARKER = ".mlsae-warehouse"
# What `mlsae run --out DIR` creates in DIR, first to last: the marker (init_warehouse),
# the task result cache, the activation cache, the trained autoencoders, the tables and
# setup.sql. A directory holding any of them is a warehouse (perhaps one whose first run
# was stopped before it logged anything: `mlsae sql` then sees empty tables).
_WAREHOUSE_ENTRIES = (WAREHOUSE_MARKER, SETUP_SQL, LOGGING_DIR, RESULTS_DIR, ACTIVATIONS_DIR,
                      AUTOENCODERS_DIR)


def init_warehouse(warehouse_dir: str | os.PathLike) -> Path:
    """Create the warehouse directory (if needed) with its marker file, so that `mlsae sql`
    accepts it before any table is written. Returns the directory."""
    root = check_local(warehouse_dir)
    root.mkdir(parents=True, exist_ok=True)
    marker = root / WAREHOUSE_MARKER
    if not marker.exists():
        marker.write_text("mlsae warehouse: tables, views and caches written by `mlsae run` "
                          "(see docs/warehouse.md)\n")
    return root


def is_warehouse(warehouse_dir: str | os.PathLike) -> bool:
    """True if the directory was made by mlsae: its marker, setup.sql, a table directory
    or one of `mlsae run`'s caches is there."""
    root = _root(warehouse_dir)
    return root.is_dir() and any((root / name).exists()
                                 for name in (*_WAREHOUSE_ENTRIES, *TABLES))


def require_warehouse(warehouse_dir: str | os.PathLike) -> Path:
    """The resolved directory; WarehouseError (saying how to make or find one) unless it is
    an mlsae warehouse: a plain directory would otherwise answer every query with 0 rows."""
    root = warehouse_location(warehouse_dir)
    try:
        exists = root.is_dir()
    except Exception as err:  # the store's client: credentials, endpoint, network
        raise WarehouseError(
            f"cannot read warehouse {warehouse_dir}: {type(err).__name__}: {err}. Check the "
            "store's settings (for s3: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY, AWS_REGION or ~/.aws)") from err
    if not exists:
        raise WarehouseError(f"warehouse {root} does not exist: pass --out DIR (or set "
                             "MLSAE_HOME) to a directory written by `mlsae run`, or make one "
                             f"with `mlsae run --out {warehouse_dir}`")
    if not is_warehouse(root):
        raise WarehouseError(
            f"{root} is not an mlsae warehouse (no saes/ or latents/ table, no setup.sql, no "
            f"{WAREHOUSE_MARKER}): make one with `mlsae run --out {warehouse_dir}`, or point "
            "--out (or $MLSAE_HOME) at a directory that `mlsae run` wrote")
    return root


TEMP_DIR = ".tmp"
PART_TABLES = ("tokens", "latents", *PART_SUM_TABLES)
"""The tables a logged part has one file in, under the same name."""


# --------------------------------------------------------------------------- a warehouse at a URL

SCRATCH_ENV = "MLSAE_SCRATCH"
COMMITS_DIR = ".commits"
LEASES_DIR = ".leases"
PUBLISH_STATE = ".tmp/published.json"
"""In a working copy: what was published, by (size, mtime), so unchanged files are not
hashed again."""


def warehouse_url(where: str | os.PathLike) -> str:
    """A URL warehouse's canonical spelling (no trailing slash): its identity in cache keys."""
    return str(where).rstrip("/")


def scratch_dir(where: str | os.PathLike) -> Path:
    """The local working copy of the warehouse at URL `where`: $MLSAE_SCRATCH (`--scratch`),
    else ~/.cache/mlsae/scratch, then a directory per URL (one scratch may serve several
    warehouses)."""
    import hashlib

    base = os.environ.get(SCRATCH_ENV) or Path.home() / ".cache" / "mlsae" / "scratch"
    digest = hashlib.sha1(warehouse_url(where).encode()).hexdigest()[:16]
    return Path(base).expanduser().resolve() / digest


def working_dir(where: str | os.PathLike) -> Path:
    """Where this process reads and writes files of the warehouse: the directory itself, or
    for a URL its working copy (scratch_dir)."""
    return scratch_dir(where) if is_url(where) else Path(where).expanduser().resolve()


def public_path(where: str | os.PathLike, local: str | os.PathLike) -> str:
    """How a task's manifest names a file of the working copy: for a URL warehouse the
    object's URL, the same on every worker (so the cache keys of the steps that take the
    manifest do not depend on a worker's scratch path); else the local path."""
    if not is_url(where):
        return str(local)
    relative = Path(local).resolve().relative_to(scratch_dir(where)).as_posix()
    return f"{warehouse_url(where)}/{relative}"


def local_path(where: str | os.PathLike, recorded: str | os.PathLike) -> Path:
    """The local file a manifest's path (public_path) names on this worker."""
    url = warehouse_url(where)
    if is_url(where) and str(recorded).startswith(url + "/"):
        return scratch_dir(where) / str(recorded)[len(url) + 1:]
    return Path(recorded)


def commit_key(unit: str) -> str:
    """The commit object of a publish unit, relative to the warehouse."""
    return f"{COMMITS_DIR}/{unit}.json"


def lease_key(name: str) -> str:
    return f"{LEASES_DIR}/{name}.json"


_PART = re.compile(r"^(?P<table>[a-z_]+)/sae_id=(?P<sae>[^/]+)/(?P<part>part-\d+)\.parquet$")
_SAE_WEIGHTS = re.compile(rf"^{AUTOENCODERS_DIR}/(?P<sae>[^/]+)/sae/[^/]+$")
_NEVER_PUBLISHED = (ACTIVATIONS_DIR + "/", TEMP_DIR + "/", ".prefect/", COMMITS_DIR + "/",
                    LEASES_DIR + "/")


_CACHE_FILE = re.compile(rf"^{ACTIVATIONS_DIR}/(?P<key>[^/.][^/]*)/(?:(?P<shard>shard-\d+)"
                         r"\.[a-z]+\.npy|(?P<manifest>manifest\.json))$")


def publish_unit(relative: str, caches: bool = False) -> str | None:
    """The unit a file of the working copy is published in (its files become visible
    together, by one commit object), or None for files that stay local (caches, temp
    files, locks, the Prefect results, which go to the bucket directly).

    A logged part's five files (tokens, latents and the three sums) form one unit, so a
    reader never sees a part without its sums; an autoencoder's saved weights (sae/) form
    one; every other file is a unit of its own.

    caches=True (a shared activation cache, Budget.shared_cache): the files of
    activations/<key>/ are units too: a shard's three arrays form one, the cache's
    manifest.json another (published after the shards it lists: publish_order)."""
    if caches and relative.startswith(ACTIVATIONS_DIR + "/"):
        found = _CACHE_FILE.match(relative)
        if found is None:
            return None  # temp files of the cache writer, anything else
        return (f"{ACTIVATIONS_DIR}/{found['key']}/"
                f"{found['shard'] or found['manifest']}")
    name = relative.rsplit("/", 1)[-1]
    if relative.startswith(_NEVER_PUBLISHED) or name.endswith(".lock") \
            or (name.startswith(".") and relative != WAREHOUSE_MARKER):
        return None
    part = _PART.match(relative)
    if part and part["table"] in TABLES:
        return f"parts/sae_id={part['sae']}/{part['part']}"
    weights = _SAE_WEIGHTS.match(relative)
    if weights:
        return f"{AUTOENCODERS_DIR}/{weights['sae']}/sae"
    return relative


def unit_complete(unit: str, relatives: list[str]) -> bool:
    """Whether a unit's local files are all there (a part needs its five tables' files,
    the weights their config and tensors); incomplete units are not published."""
    names = {r.rsplit("/", 1)[-1] for r in relatives}
    if unit.startswith(ACTIVATIONS_DIR + "/") and unit.rsplit("/", 1)[-1].startswith("shard-"):
        from mlsae.cache import ARRAYS  # the cache's own list of a shard's arrays

        return len(relatives) == len(ARRAYS)
    if unit.startswith("parts/"):
        return len(relatives) == len(PART_TABLES)
    if unit.startswith(AUTOENCODERS_DIR + "/") and unit.endswith("/sae"):
        return "config.json" in names and any(n.endswith(".safetensors") for n in names)
    return bool(relatives)


def publish_order(unit: str) -> tuple[bool, str]:
    """Sort key of the units one publish commits: an activation cache's manifest after its
    shards, so a worker that pulls a manifest finds every shard it lists committed."""
    return (unit.startswith(ACTIVATIONS_DIR + "/") and unit.endswith("/manifest.json"), unit)


def unit_sae_id(unit: str) -> str | None:
    """The autoencoder a unit belongs to (None: shared files such as figures or lenses)."""
    for pattern in (r"^parts/sae_id=([^/]+)/", r"^[a-z_]+/sae_id=([^/]+)/",
                    rf"^{AUTOENCODERS_DIR}/([^/]+)/"):
        found = re.match(pattern, unit)
        if found:
            return found[1]
    return None


def sae_prefixes(sae_id: str) -> list[str]:
    """Every prefix (relative to the warehouse) under which one autoencoder's objects
    live: its partition of each table, its training run and its logging manifest."""
    check_sae_id(sae_id)
    return ([f"{table}/sae_id={sae_id}/" for table in TABLES]
            + [f"{AUTOENCODERS_DIR}/{sae_id}/", f"{LOGGING_DIR}/sae_id={sae_id}/"])
