"""Headline views over a warehouse in a bucket vs the same warehouse on local disk.

    .venv/bin/python benchmarks/bench_s3_read.py --warehouse mlsae-data [--repeats 5]

Starts moto's S3-compatible server on a free loopback port (a real HTTP server; the
standard AWS settings point s3fs at it), uploads the warehouse's tables (not its
caches or autoencoders) as `aws s3 sync` would, then times each query through
mlsae.warehouse.run_readonly_sql (a fresh connection each time, as `mlsae sql` makes:
listing and footer checks included) on the local directory and on s3://.../wh.
Queries on a bucket run on a local mirror of its tables (mlsae/warehouse/mirror.py):
the first one downloads them (timed apart), each later one lists the bucket and
downloads only what changed. Prints the median seconds of each and their ratio (goal:
within 3x). moto is a Python server, slower than a real store on the same network.
Not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUERIES = {
    "variance_summary": "SELECT * FROM variance_summary",
    "latent_stats (heaviest 20)": "SELECT * FROM latent_stats ORDER BY mass DESC LIMIT 20",
    "layer_stats": "SELECT * FROM layer_stats",
    "layer_metrics": "SELECT * FROM layer_metrics",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warehouse", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1")
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    import s3fs

    from mlsae import warehouse as wh

    local = wh.require_warehouse(args.warehouse)
    fs = s3fs.S3FileSystem()
    fs.mkdir("mlsae-bench")
    start = time.perf_counter()
    uploaded = 0
    for table in wh.TABLES:
        if wh.table_dir(local, table).is_dir():
            fs.put(str(wh.table_dir(local, table)) + "/", f"mlsae-bench/wh/{table}/",
                   recursive=True)
            uploaded += sum(f.stat().st_size for f in wh.table_files(local, table))
    fs.put(str(local / wh.WAREHOUSE_MARKER), f"mlsae-bench/wh/{wh.WAREHOUSE_MARKER}")
    print(f"uploaded {uploaded / 1e6:.1f} MB of tables in {time.perf_counter() - start:.1f} s",
          file=sys.stderr)
    url = "s3://mlsae-bench/wh"
    os.environ["MLSAE_MIRROR_DIR"] = tempfile.mkdtemp(prefix="mlsae-bench-mirror-")
    start = time.perf_counter()
    wh.run_readonly_sql(url, "SELECT count(*) FROM saes")
    print(f"first query on the bucket (lists it and downloads the tables into the local "
          f"mirror): {time.perf_counter() - start:.2f} s", file=sys.stderr)
    print(f"\n{args.warehouse}: median of {args.repeats}, a fresh connection each\n")
    print("| query | local (s) | bucket (s) | bucket / local |")
    print("|---|---|---|---|")
    for name, sql in QUERIES.items():
        times = {}
        for where in (local, url):
            wh.run_readonly_sql(where, sql)  # warm (listing caches, page cache)
            runs = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                wh.run_readonly_sql(where, sql)
                runs.append(time.perf_counter() - t0)
            times[where] = statistics.median(runs)
        print(f"| {name} | {times[local]:.3f} | {times[url]:.3f} | "
              f"{times[url] / times[local]:.2f} |")
    server.stop()


if __name__ == "__main__":
    main()
