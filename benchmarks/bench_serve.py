"""`mlsae serve` latency on the embedded model vs a bare forward pass, in the same run.

    .venv/bin/python benchmarks/bench_serve.py [--out WAREHOUSE] [--repeats 30] [--threads 2]

Without --out it builds the tests' small warehouse (tests/serve_warehouse.py: an MLSAE
R 4, k 8 on the embedded model, ~10 s). Then it serves it with uvicorn on a loopback port
and times, warm (the model and SAE are loaded by a first request), over real HTTP:
- floor:             model(input_ids) on the 20-token prompt, the bare forward pass;
- POST /api/prompt:  20 tokens -> activations, Fig. 3 heatmap (DuckDB), logits clean and
                     with the middle layer reconstructed (delta CE, KL);
- ... + steering:    the same with a steered run (one more forward pass);
- analyse() direct:  the same work without HTTP/JSON (mlsae.serve.prompt.analyse);
- GET /api/latent:   a latent's panels (three warehouse queries + decoder panels);
- GET /api/saes:     the home page's data.
Median and 90th percentile of --repeats, and the median's ratio to the floor's median.
Not a test: run it by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

TEXT = ("When John and Mary went to the store, John gave a drink to Mary because she was "
        "thirsty after the long walk home")


def _times(fn: Callable[[], object], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read())


def _get(url: str) -> dict:
    with urllib.request.urlopen(url) as r:
        return json.loads(r.read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="warehouse (default: build one)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import uvicorn

    from mlsae.serve.api import PromptRequest
    from mlsae.serve.app import create_app

    root = args.out
    if root is None:
        from tests.serve_warehouse import _build

        root = _build(Path(tempfile.mkdtemp(prefix="bench-serve-")) / "mlsae-data")
    app = create_app(root, device="cpu")
    explorer = app.state.explorer
    sae_id = explorer.catalog.saes()[0]["sae_id"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"

    handle = explorer.loader.get(explorer.catalog.sae(sae_id))
    tokenizer, model = handle.loaded.tokenizer, handle.loaded.model
    ids = tokenizer(TEXT)["input_ids"][:20]
    text = tokenizer.decode(ids)
    assert len(tokenizer(text)["input_ids"]) == 20, "the prompt must be 20 tokens"
    ids_BT = torch.tensor([ids])
    body = {"sae_id": sae_id, "text": text}
    steer = {**body, "steer": {"latent": 3, "layer": handle.layers[1], "factor": 10.0}}
    latent = int(explorer.catalog.panel(
        "SELECT latent FROM latent_stats WHERE sae_id = $sae ORDER BY count DESC LIMIT 1",
        sae=sae_id).rows[0]["latent"])

    def floor() -> None:
        with torch.inference_mode():
            model(input_ids=ids_BT, use_cache=False)

    cases: list[tuple[str, Callable[[], object]]] = [
        ("floor: model(ids), 20 tokens", floor),
        ("POST /api/prompt", lambda: _post(base + "/api/prompt", body)),
        ("POST /api/prompt + steering", lambda: _post(base + "/api/prompt", steer)),
        ("analyse() direct (no HTTP)", lambda: explorer.prompt(PromptRequest(**body))),
        ("GET /api/latent/{sae}/{j}", lambda: _get(f"{base}/api/latent/{sae_id}/{latent}")),
        ("GET /api/saes", lambda: _get(base + "/api/saes")),
    ]
    for _, fn in cases:  # warm: loads, first-call costs
        fn()
        fn()
    print(f"warehouse {root}; sae {sae_id}; 20-token prompt; torch threads {args.threads}; "
          f"load average {os.getloadavg()[0]:.2f}; {args.repeats} repeats")
    print(f"| {'what':<32} | median ms | p90 ms | x floor (median) |")
    print(f"| {'-' * 32} | --------- | ------ | ---------------- |")
    floor_median = None
    for name, fn in cases:
        times = sorted(_times(fn, args.repeats))
        median = statistics.median(times)
        p90 = times[min(len(times) - 1, int(0.9 * len(times)))]
        floor_median = floor_median or median
        print(f"| {name:<32} | {median * 1e3:9.1f} | {p90 * 1e3:6.1f} | "
              f"{median / floor_median:16.1f} |")
    server.should_exit = True


if __name__ == "__main__":
    main()
