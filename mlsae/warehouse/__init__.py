"""The warehouse: where each table's Parquet files live and how they are
written, a DuckDB connection with every table and sql/ view registered, and the
read-only guard behind `mlsae sql`.

Layout (one directory per table and SAE, so two SAEs never share a file):

    <warehouse>/saes/sae_id=<id>/saes.parquet
    <warehouse>/layer_metrics/sae_id=<id>/layer_metrics.parquet
    <warehouse>/tokens/sae_id=<id>/part-00000.parquet
    <warehouse>/latents/sae_id=<id>/part-00000.parquet
    <warehouse>/setup.sql      (the same views for the plain duckdb CLI)
    <warehouse>/.tmp/<table>/sae_id=<id>/   files being written (then renamed into place)

Table directories hold only finished Parquet files, so plain Polars / duckdb can scan
them. Every file carries its own sae_id column (a plain string, dictionary-encoded in
Parquet: ~0 bytes), so a file is meaningful on its own; the directory name is only for
people and for pruning. docs/warehouse.md explains the types and encodings and their
measured cost.
"""

# One module per job (layout.py alone knows where things live); this package's
# namespace is the public API every caller uses (`from mlsae import warehouse`).

from mlsae.warehouse.duck import (  # noqa: F401
    SqlFile,
    check_part_sums,
    connect,
    memory_connection,
    missing_part_sums,
    part_connection,
    query_dicts,
    setup_sql,
    sql_files,
    table_view_sql,
    write_setup_script,
)
from mlsae.warehouse.errors import (  # noqa: F401
    ReadOnlyError,
    WarehouseError,
)
from mlsae.warehouse.layout import (  # noqa: F401
    ACTIVATIONS_DIR,
    AUTOENCODERS_DIR,
    FIGURES_DIR,
    LENSES_DIR,
    LOGGING_DIR,
    REPORT_DIR,
    REPORT_FILE,
    RESULTS_DIR,
    SETUP_SQL,
    TEMP_DIR,
    TRAINED_WEIGHTS_DIR,
    WAREHOUSE_MARKER,
    activation_cache_dir,
    activation_caches,
    autoencoder_dir,
    autoencoder_dirs,
    check_local,
    check_writable,
    figures_dir,
    figures_prefix,
    init_warehouse,
    is_url,
    is_warehouse,
    lenses_dir,
    local_path,
    logging_dir,
    part_path,
    partition_dir,
    public_path,
    report_dir,
    report_file,
    report_key,
    report_prefix,
    require_warehouse,
    results_dir,
    scratch_dir,
    scratch_results_dir,
    setup_sql_path,
    table_dir,
    table_glob,
    trained_weights_dir,
    trash_dir,
    warehouse_location,
    warehouse_url,
    working_dir,
)
from mlsae.warehouse.parquet import (  # noqa: F401
    AtomicParquetWriter,
    check_file,
    dictionary_sae_id_files,
    iter_partitions,
    remove_stale_temp_files,
    rewrite_dictionary_sae_ids,
    table_files,
    verify_warehouse,
    write_table_atomic,
)
from mlsae.warehouse.readonly import (  # noqa: F401
    QueryResult,
    arrow_readonly,
    check_readonly_statement,
    execute_readonly,
    run_readonly_sql,
)
from mlsae.warehouse.records import (  # noqa: F401
    LAYER_METRIC_COLUMNS,
    SaeRecord,
    sae_record_from_config,
    write_layer_metrics,
    write_sae_record,
)
from mlsae.warehouse.tables import (  # noqa: F401
    PART_SUM_TABLES,
    ROW_GROUP_ROWS,
    SAE_ID_PATTERN,
    TABLE_SPECS,
    TABLES,
    TableSpec,
    check_sae_id,
    latent_rows,
    quantize_values,
    sae_id_column,
    token_rows,
)
