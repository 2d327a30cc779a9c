"""Benchmark: the headline views in DuckDB and Polars on synthetic latent tables,
beside a bare `SELECT count(*), sum(value)` scan of the same files in the same run.

    .venv/bin/python benchmarks/bench_sql.py                 # 10M and 100M rows
    .venv/bin/python benchmarks/bench_sql.py --rows 10M --engines duckdb

The tables are written by mlsae.latents.write_latents (the logger's own writer,
with a synthetic encoder in place of the model + SAE): the embedded model's 6
layers, k = 32, n = 16384 latents (d 256 x R 64), 256-token sequences. Each token
draws a pool of 48 latents (Zipf-like popularity, so some latents are rare or
dead) and each layer fires 32 of them, so latents are active at several layers of
a token, as in real MLSAEs. Every query runs in a fresh process (so its peak RSS
is its own) with the given threads and memory limit. Targets (issue 4): each view
within 5x the bare scan; 100M rows analysed in < 1 min on 2 cores in 24 GiB.
Besides wall seconds it reports each query's CPU seconds and the load average: on a
shared machine the wall time of a 2-thread query stretches with the load, its CPU
time much less (quiet-machine wall time ~= CPU seconds / threads for parallel scans).

The views read the per-part sums the logger stores (sql/part_sums.sql); their cost
moves to logging time, which this reports too: the sums are deleted and recomputed
from the logged parts (mlsae.latents.complete_part_sums, the same code the logger
runs after each part) in a fresh process, seconds, CPU seconds, peak RSS and bytes
per activation. DuckDB also times the ad-hoc path (the same analyses from the raw
rows, mlsae.part_sums.ON_THE_FLY) beside `token_groups`, the bare per-(token, latent)
GROUP BY that SPEC 5's per-token variance needs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

N_LAYERS, K, N_LATENTS, SEQ_LEN, POOL = 6, 32, 16384, 256, 48
VIEWS = ("latent_layers", "latent_stats", "variance_summary")
# The ad-hoc path (from the raw rows) and its floor; DuckDB only.
AD_HOC = ("token_groups", *(f"{view}_of" for view in VIEWS))


def parse_rows(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1], 1)
    return int(float(text.rstrip("KMG")) * scale)


def synthetic_encoder(seed: int):
    """encode(tokens_BT, mask_BT) -> (acts_NLK, idx_NLK), deterministic per batch content."""
    popularity = 1.0 / np.arange(1, N_LATENTS + 1) ** 0.6
    cdf = np.cumsum(popularity / popularity.sum())
    perm = np.random.default_rng(seed).permutation(N_LATENTS)  # popular ids spread out

    def encode(tokens_BT: np.ndarray, mask_BT: np.ndarray):
        rng = np.random.default_rng([seed, int(tokens_BT[0, 0]), int(tokens_BT.sum())])
        n = int(mask_BT.sum())
        pool = perm[np.searchsorted(cdf, rng.random((n, POOL)))]
        choice = np.argsort(rng.random((n, N_LAYERS, POOL)), axis=-1)[..., :K]
        idx = np.take_along_axis(np.broadcast_to(pool[:, None, :], (n, N_LAYERS, POOL)), choice, -1)
        acts = rng.lognormal(-0.5, 1.0, size=idx.shape).astype(np.float32)
        return acts, idx

    return encode


def build_warehouse(root: Path, rows: int, seed: int = 0) -> Path:
    """A warehouse with ~`rows` latent rows (reused if already complete)."""
    from mlsae.latents import LatentLogConfig, SaeRecord, write_latents

    n_seq = max(1, round(rows / (SEQ_LEN * N_LAYERS * K)))
    record = SaeRecord(sae_id="bench-x64-k32", model="synthetic", d_model=256,
                       n_latents=N_LATENTS, expansion_factor=64, k=K,
                       layers=list(range(N_LAYERS)))
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 8192, size=(n_seq, SEQ_LEN), dtype=np.int32)
    tokens[:, 0] = np.arange(n_seq) % 8192  # distinct batches -> distinct encoder seeds
    mask = np.ones_like(tokens, dtype=bool)
    t0 = time.perf_counter()
    result = write_latents(root, record, zip(tokens, mask, strict=True), synthetic_encoder(seed),
                           lambda i: f" w{i}", {"synthetic": rows, "seed": seed},
                           LatentLogConfig(batch_size=16), progress_log=lambda _: None)
    if result.parts_written:
        print(f"  wrote {result.n_rows:,} rows in {time.perf_counter() - t0:.0f}s", flush=True)
    return root


CHILD = r"""
import json, os, resource, sys, time
sys.path.insert(0, {repo!r})
engine, query, root, threads, memory = sys.argv[1:6]

def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

t0 = time.perf_counter()
if engine == "sums":
    from mlsae.latents import complete_part_sums
    t0, c0 = time.perf_counter(), cpu()
    n = complete_part_sums(root)
elif engine == "duckdb":
    from mlsae.part_sums import ON_THE_FLY
    from mlsae.warehouse import connect
    con = connect(root, read_only=True, threads=int(threads), memory_limit=memory)
    sql = {{"bare": "SELECT count(*), sum(value) FROM latents",
           "token_groups": "SELECT count(*) FROM (SELECT seq_id, pos, latent, sum(value) "
                           "FROM latents GROUP BY ALL)",
           **{{f"{{view}}_of": text for view, text in ON_THE_FLY.items()}},
           }}.get(query, f"SELECT * FROM {{query}}")
    t0, c0 = time.perf_counter(), cpu()
    out = con.sql(sql).to_arrow_table()
    n = out.num_rows
else:
    import polars as pl
    from mlsae import analysis_polars as ap
    t0, c0 = time.perf_counter(), cpu()
    lat = ap.scan_table(root, "latents")
    if query == "bare":
        frame = lat.select(pl.len(), pl.col("value").sum())
    else:
        frame = getattr(ap, query)(root)
    n = frame.collect(engine="streaming").height
seconds = time.perf_counter() - t0
cpu_seconds = cpu() - c0
# VmHWM (not ru_maxrss, which keeps the forking parent's size across exec)
status = open("/proc/self/status").read().split("VmHWM:")[1].split()
peak = int(status[0]) * 1024
print(json.dumps({{"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_bytes": peak,
                  "rows": n, "load": os.getloadavg()[0]}}))
"""


def run_query(engine: str, query: str, root: Path, threads: int, memory: str) -> dict:
    env = dict(os.environ, POLARS_MAX_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, "-c", CHILD.format(repo=str(REPO)), engine, query,
                           str(root), str(threads), memory],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table_bytes(root: Path, table: str = "latents") -> tuple[int, int]:
    import pyarrow.parquet as pq

    files = list((root / table).glob("*/*.parquet"))
    return sum(pq.read_metadata(f).num_rows for f in files), sum(f.stat().st_size for f in files)


def measure_sums(root: Path, n_rows: int, threads: int, memory: str) -> dict:
    """Delete the stored per-part sums and recompute them from the logged parts, as the
    logger does after each part: the logging-time cost of the fast views."""
    import shutil

    from mlsae.warehouse import PART_SUM_TABLES

    for table in PART_SUM_TABLES:
        shutil.rmtree(root / table, ignore_errors=True)
    result = run_query("sums", "complete_part_sums", root, threads, memory)
    sums_bytes = sum(table_bytes(root, table)[1] for table in PART_SUM_TABLES)
    result["bytes_per_activation"] = sums_bytes / n_rows
    print(f"  sums    recomputed {result['rows']} parts in {result['seconds']:.2f}s  "
          f"cpu {result['cpu_seconds']:.2f}s ({result['cpu_seconds'] * 1e8 / n_rows:.1f} "
          f"CPU-s per 100M rows)  peak {result['peak_bytes'] / 2**30:.2f} GiB  "
          f"{sums_bytes / 2**20:.1f} MiB = {result['bytes_per_activation']:.3f} B/activation  "
          f"load {result['load']:.1f}", flush=True)
    return result


LAYOUTS = {
    # name: (column types, compression, dictionary columns, column encodings, mantissa bits)
    "naive int64/float64, uncompressed": (("int64",) * 4 + ("float64",), "none", False, None, 23),
    "naive int64/float64, snappy": (("int64",) * 4 + ("float64",), "snappy", False, None, 23),
    "small ints, float32 exact, zstd": (("int32", "int16", "int16", "int32", "float32"),
                                        "zstd", ["seq_id", "pos", "layer"], None, 23),
    "+ BYTE_STREAM_SPLIT value": (("int32", "int16", "int16", "int32", "float32"), "zstd",
                                  ["seq_id", "pos", "layer"], {"value": "BYTE_STREAM_SPLIT"}, 23),
    "+ 10-bit mantissa (chosen)": (("int32", "int16", "int16", "int32", "float32"), "zstd",
                                   ["seq_id", "pos", "layer"], {"value": "BYTE_STREAM_SPLIT"}, 10),
}


def compare_layouts(root: Path) -> None:
    """Rewrite one latents table in several layouts: bytes per row per column, scan rows/s."""
    import duckdb
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mlsae.warehouse import quantize_values

    files = sorted((root / "latents").glob("*/*.parquet"))
    data = pq.ParquetDataset(files, partitioning=None).read().drop_columns(["sae_id"])
    n = data.num_rows
    # the stored values are already rounded: draw fresh exact ones from the same distribution
    exact = np.random.default_rng(1).lognormal(-0.5, 1.0, n).astype(np.float32)
    data = data.set_column(4, "value", pa.array(exact))
    columns = ["seq_id", "pos", "layer", "latent", "value"]
    print(f"  layouts ({n:,} rows; sae_id is one dictionary-encoded value, ~0 bytes, left out):")
    for name, (types, codec, dictionary, encoding, bits) in LAYOUTS.items():
        arrays = [data[c].combine_chunks() for c in columns]
        arrays[4] = pa.array(quantize_values(arrays[4].to_numpy(), bits))
        table = pa.table([a.cast(t) for a, t in zip(arrays, types, strict=True)], names=columns)
        path = root / "layout.parquet.tmp"
        pq.write_table(table, path, compression=codec, use_dictionary=dictionary,
                       column_encoding=encoding, row_group_size=1 << 20)
        meta = pq.read_metadata(path)
        per_column = {c: sum(meta.row_group(g).column(i).total_compressed_size
                             for g in range(meta.num_row_groups)) / n
                      for i, c in enumerate(columns)}
        con = duckdb.connect()
        con.execute("SET threads = 2")
        scan = f"SELECT count(*), sum(value) FROM read_parquet('{path}')"
        con.execute(scan).fetchall()
        t0 = time.perf_counter()
        con.execute(scan).fetchall()
        seconds = time.perf_counter() - t0
        print(f"    {name:33s} {path.stat().st_size / n:5.2f} B/row  "
              + " ".join(f"{c} {b:.2f}" for c, b in per_column.items())
              + f"  | scan {n / seconds / 1e6:5.0f} M rows/s", flush=True)
        path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="10M,100M", help="comma-separated sizes (e.g. 10M,100M)")
    parser.add_argument("--engines", default="duckdb,polars")
    parser.add_argument("--dir", default="/tmp/mlsae-bench-sql", help="where tables are built")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-limit", default="16GB", help="DuckDB memory_limit")
    parser.add_argument("--repeat", type=int, default=1, help="runs per query (best is kept)")
    parser.add_argument("--layouts", action="store_true",
                        help="also compare storage layouts on the first size")
    args = parser.parse_args()

    results = []
    for size in args.rows.split(","):
        rows = parse_rows(size)
        root = Path(args.dir) / f"rows-{size.strip()}"
        print(f"== {size}: building/reusing {root}", flush=True)
        build_warehouse(root, rows)
        n_rows, n_bytes = table_bytes(root)
        print(f"  latents: {n_rows:,} rows, {n_bytes / 2**20:,.1f} MiB, "
              f"{n_bytes / n_rows:.2f} bytes/row", flush=True)
        if args.layouts and size == args.rows.split(",")[0]:
            compare_layouts(root)
        sums = measure_sums(root, n_rows, args.threads, args.memory_limit)
        results.append({"rows": n_rows, "engine": "sums", "sums": sums})
        for engine in args.engines.split(","):
            run_query(engine, "bare", root, args.threads, args.memory_limit)  # warm page cache
            timings = {}
            for query in ("bare", *VIEWS, *(AD_HOC if engine == "duckdb" else ())):
                runs = [run_query(engine, query, root, args.threads, args.memory_limit)
                        for _ in range(args.repeat)]
                ok = [r for r in runs if "error" not in r]
                best = min(ok, key=lambda r: r["seconds"]) if ok else runs[0]
                timings[query] = best
                if "error" in best:
                    print(f"  {engine:7s} {query:17s} ERROR {best['error']}", flush=True)
                    continue
                ratio = best["seconds"] / timings["bare"]["seconds"]
                cpu_ratio = best["cpu_seconds"] / timings["bare"]["cpu_seconds"]
                print(f"  {engine:7s} {query:22s} {best['seconds']:8.2f}s  x{ratio:5.1f} bare  "
                      f"cpu {best['cpu_seconds']:7.2f}s  x{cpu_ratio:5.1f} bare  "
                      f"peak {best['peak_bytes'] / 2**30:5.2f} GiB  load {best['load']:.1f}",
                      flush=True)
            total = sum(t.get("seconds", float("nan")) for q, t in timings.items() if q in VIEWS)
            total_cpu = sum(t.get("cpu_seconds", float("nan"))
                            for q, t in timings.items() if q in VIEWS)
            print(f"  {engine:7s} all three views        {total:8.2f}s  cpu {total_cpu:.2f}s",
                  flush=True)
            results.append({"rows": n_rows, "bytes": n_bytes, "engine": engine, **timings})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
