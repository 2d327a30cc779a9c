"""Scale rehearsal: the real CLI with `--preset paper` on Pythia-70m/160m-shaped random models.

    .venv/bin/python benchmarks/bench_scale.py [--models 70m,160m] [--quick]
        [--device cpu] [--precision float32] [--json-out scale.json]

For each model it builds a random-weight GPT-NeoX with the EXACT architecture of
Pythia-70m (6 x 512, 8 heads, intermediate 2048, vocab 50304, rotary 0.25,
parallel residual, untied) or Pythia-160m (12 x 768, 12 heads, intermediate 3072)
from its config (no download), saves it with save_pretrained next to the embedded
tokenizer (8k vocab: every token id stays < 50304), then runs

    mlsae run --model DIR --preset paper --cache-limit 0 --no-baselines \
        --train-tokens N --eval-tokens M --batch-tokens B --out TMP

(budgets scaled down, everything else the paper's recipe: R 64, k 32, k_aux 256,
2048-token sequences), after the same command with `--dry-run --json` (its
estimated_seconds is reported beside the measured wall time). It measures the
wall time, the peak RSS of the process tree (polled), the disk used under the
warehouse (peak and final), tokens/s per stage (parsed from the run's progress
lines), and in the same process the floor: the bare forward pass (capture of
every block output, as mlsae.hooks.capture_residuals) in tokens/s and the bare SAE
step (mlsae.sae.step.train_step, paper shape) in examples/s. From these: the
streaming training throughput as a fraction of (bare forward + SAE steps) (goal
>= 80%) and the projection to the full preset (1B training tokens, 10M held-out
tokens) in hours. Prints a Markdown table; `--json-out` writes the figures.
Not a test: run it by hand (about 15 minutes on 2 CPU cores for both models).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
MLSAE = ROOT / ".venv" / "bin" / "mlsae"

ARCHS = {
    "70m": dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                intermediate_size=2048),
    "160m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072),
}
COMMON_ARCH = dict(vocab_size=50304, rotary_pct=0.25, use_parallel_residual=True,
                   tie_word_embeddings=False, max_position_embeddings=2048,
                   layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=0)

# Scaled budgets (train tokens per layer, eval tokens, tokens per optimizer step, seq len)
# chosen so one run takes at most ~8 minutes on 2 CPU cores (160m: ~6 minutes).
BUDGETS = {
    "70m": dict(train_tokens=98_304, eval_tokens=2_048, batch_tokens=8_192, seq_len=2_048),
    "160m": dict(train_tokens=24_576, eval_tokens=2_048, batch_tokens=4_096, seq_len=2_048),
}
QUICK = {
    "70m": dict(train_tokens=4_096, eval_tokens=256, batch_tokens=2_048, seq_len=256),
    "160m": dict(train_tokens=2_048, eval_tokens=256, batch_tokens=1_024, seq_len=256),
}
FULL_TRAIN_TOKENS = 1_000_000_000
FULL_EVAL_TOKENS = 10_000_000
R, K = 64, 32


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def build_model(name: str, directory: Path) -> Path:
    """Random-weight GPT-NeoX of Pythia-<name>'s architecture + the embedded tokenizer."""
    import torch
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    from mlsae.paths import EMBEDDED_MODEL_DIR

    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR)
    assert len(tokenizer) <= COMMON_ARCH["vocab_size"]
    config = GPTNeoXConfig(**ARCHS[name], **COMMON_ARCH)
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config).eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# ---------------------------------------------------------------------- the floor


def floor(model_dir: Path, device: str, precision: str, seq_len: int,
          examples: int) -> dict:
    """Bare forward tokens/s (block outputs captured) and bare SAE step examples/s."""
    import torch

    from mlsae.hooks import capture_residuals
    from mlsae.models import load_model
    from mlsae.sae.config import SAEConfig
    from mlsae.sae.model import MLSAE
    from mlsae.sae.step import DeadCounter, make_optimizer, train_step

    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(precision)
    loaded = load_model(str(model_dir), device=device)
    model = loaded.model
    dev = next(model.parameters()).device
    cuda = dev.type == "cuda"
    n_layers = model.config.num_hidden_layers
    d = model.config.hidden_size

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    batch = max(1, 4096 // seq_len)
    ids = torch.randint(0, 8000, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to(dev)
    times = []
    for _ in range(5):  # the first 1-2 calls of a fresh process are up to 3x slower
        sync()
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            capture_residuals(model, ids).to("cpu", non_blocking=False)
        sync()
        times.append(time.perf_counter() - t0)
    forward_tps = batch * seq_len / min(times[2:])
    del model, loaded

    cfg = SAEConfig(d_model=d, n_layers=n_layers, expansion_factor=R, k=K, k_aux=256,
                    aux_coef=1 / 32)
    sae = MLSAE(cfg, seed=0, device=dev)
    opt = make_optimizer(sae, 1e-4, (0.9, 0.999), 6.25e-10)
    dead = DeadCounter(cfg.n_latents, dev)
    rows = examples - examples % n_layers
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(rows, d, generator=gen) * (torch.rand(d, generator=gen) * 2 + 0.1)
         + 0.5).to(dev)
    pos = torch.arange(n_layers, device=dev).repeat(rows // n_layers)
    times = []
    for _ in range(4):
        sync()
        t0 = time.perf_counter()
        train_step(sae, opt, x, pos, n_layers, dead=dead, compute_dtype=dtype)
        sync()
        times.append(time.perf_counter() - t0)
    sae_eps = rows / min(times[1:])
    per_token_s = 1 / forward_tps + n_layers / sae_eps
    return {"forward_tokens_per_s": round(forward_tps, 1),
            "sae_examples_per_s": round(sae_eps, 1), "sae_floor_examples": rows,
            "floor_train_tokens_per_s": round(1 / per_token_s, 1),
            "loadavg": loadavg()}


# ---------------------------------------------------------------------- the run

PREFECT = re.compile(r"^(?P<clock>\d\d:\d\d:\d\d\.\d+) \| \w+\s*\| (?:Task|Flow) run '(?P<task>[^']+)' - (?P<msg>.*)$")
PROGRESS = re.compile(r"^(?P<desc>[^:|]+?): (?P<done>[\d,]+)(?:/(?P<total>[\d,]+))?"
                      r".*?\|\s*(?P<rate>[\d,.]+) (?P<unit>[\w ]+?)/s")


def tree_rss(pid: int) -> int:
    try:
        import psutil
    except ImportError:  # /proc fallback: the process and its direct+indirect children
        return _proc_tree_rss(pid)
    try:
        proc = psutil.Process(pid)
        procs = [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def _proc_tree_rss(pid: int) -> int:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def du(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += (Path(dirpath) / f).stat().st_blocks * 512
    return total


def run_env(work: Path) -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", DO_NOT_TRACK="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90",
               PREFECT_HOME=str(work / "prefect-home"))
    return env


def cli_args(model_dir: Path, out: Path, budget: dict, device: str, precision: str) -> list[str]:
    return [str(MLSAE), "run", "--model", str(model_dir), "--preset", "paper",
            "--cache-limit", "0", "--no-baselines",
            "--train-tokens", str(budget["train_tokens"]),
            "--eval-tokens", str(budget["eval_tokens"]),
            "--batch-tokens", str(budget["batch_tokens"]),
            "--seq-len", str(budget["seq_len"]),
            "--device", device, "--precision", precision, "--out", str(out)]


def dry_run(args: list[str], env: dict) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(args + ["--dry-run", "--json"], env=env, capture_output=True,
                          text=True, timeout=900)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": f"rc {proc.returncode}: {proc.stderr[-2000:]}", "wall_s": round(wall, 1)}
    text = proc.stdout
    plan = json.loads(text[text.index("{"):])
    return {"estimated_seconds": plan.get("estimated_seconds"),
            "stages_seconds": plan.get("stages_seconds"), "probe": plan.get("probe"),
            "training_source": plan.get("training_source"),
            "shuffle_buffer_bytes": plan.get("shuffle_buffer_bytes"),
            "steps": plan.get("steps"), "wall_s": round(wall, 1)}


def real_run(args: list[str], env: dict, out: Path, log_path: Path, timeout: float) -> dict:
    t0 = time.perf_counter()
    log = log_path.open("w")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    peak = {"rss": 0, "disk": 0}
    stop = threading.Event()

    def poll() -> None:
        n = 0
        while not stop.is_set():
            peak["rss"] = max(peak["rss"], tree_rss(proc.pid))
            if n % 10 == 0:
                peak["disk"] = max(peak["disk"], du(out))
            n += 1
            stop.wait(0.5)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    stages: dict[str, dict] = {}
    tasks: dict[str, dict] = {}
    points: dict[str, list[tuple[float, int]]] = {}
    done_line = None
    lines: list[str] = []
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.rstrip("\n")
        log.write(f"[{time.perf_counter() - t0:7.1f}s] {line}\n")
        log.flush()
        lines.append(line)
        pm = PREFECT.match(line)
        if pm:
            task = re.sub(r"-[0-9a-f]{3}$", "", pm["task"])
            now = round(time.perf_counter() - t0, 1)
            tasks.setdefault(task, {"first_s": now})["last_s"] = now
            line = pm["msg"]
        if line.startswith("Done in"):
            done_line = line
        for part in line.split("\r"):
            m = PROGRESS.search(part.strip())
            if m:
                stage = _stage(m["desc"].strip())
                points.setdefault(stage, []).append(
                    (round(time.perf_counter() - t0, 1), int(m["done"].replace(",", ""))))
                stages[stage] = {"desc": m["desc"].strip(),
                                 "done": int(m["done"].replace(",", "")),
                                 "total": int(m["total"].replace(",", "")) if m["total"] else None,
                                 "rate": float(m["rate"].replace(",", "")), "unit": m["unit"],
                                 "t": round(time.perf_counter() - t0, 1)}
    rc = proc.wait()
    timer.cancel()
    wall = time.perf_counter() - t0
    stop.set()
    poller.join()
    log.close()
    return {"rc": rc, "wall_s": round(wall, 1), "peak_rss_bytes": peak["rss"],
            "peak_disk_bytes": max(peak["disk"], du(out)), "final_disk_bytes": du(out),
            "stages": stages, "tasks_seconds": {k: round(v["last_s"] - v["first_s"], 1)
                                                for k, v in tasks.items()},
            "tasks": tasks, "cli_done_line": done_line,
            "steady_tokens_per_s": {k: steady_rate(v) for k, v in points.items()}, "tail": lines[-15:] if rc else [],
            "loadavg_end": loadavg()}


def steady_rate(points: list[tuple[float, int]]) -> float | None:
    """Tokens/s between progress lines after the first third of the stage.

    When the shuffle buffer (paper: 262,144 tokens) is larger than a scaled-down budget,
    the whole training set is forwarded into it before the first step: this rate is
    then the SAE steps alone, not streaming; the task's wall rate is the honest figure.
    """
    points = sorted(set(points))
    if len(points) < 3:
        return None
    (t0, d0), (t1, d1) = points[len(points) // 3], points[-1]
    return round((d1 - d0) / (t1 - t0), 1) if t1 > t0 and d1 > d0 else None


def _stage(desc: str) -> str:
    """Progress descriptions -> one stage name (the last line of each stage wins)."""
    low = desc.lower()
    for key, stage in (("train", "train"), ("extract", "extract"), ("eval", "eval"),
                       ("latent", "log"), ("log", "log"), ("lens", "lens")):
        if key in low:
            return stage
    return low


# ---------------------------------------------------------------------- report


def bench_model(name: str, budget: dict, device: str, precision: str, work: Path,
                keep_logs: Path | None, timeout: float = 3600) -> dict:
    model_dir = work / f"pythia-{name}-shaped"
    out = work / f"warehouse-{name}"
    print(f"[{name}] building the random model ...", flush=True)
    build_model(name, model_dir)
    env = run_env(work)
    args = cli_args(model_dir, out, budget, device, precision)
    print(f"[{name}] dry run: {' '.join(args[1:])} --dry-run --json", flush=True)
    dry = dry_run(args, env)
    print(f"[{name}]   estimated {dry.get('estimated_seconds')} s ({dry})", flush=True)
    n_layers = ARCHS[name]["num_hidden_layers"]
    examples = min(budget["batch_tokens"] * n_layers, 8192)
    print(f"[{name}] floor (bare forward + bare SAE step, {examples} examples) ...", flush=True)
    fl = floor(model_dir, device, precision, budget["seq_len"], examples)
    print(f"[{name}]   {fl}", flush=True)
    log_path = (keep_logs or work) / f"run-{name}.log"
    print(f"[{name}] real run (log: {log_path}) ...", flush=True)
    load_start = loadavg()
    run = real_run(args, env, out, log_path, timeout=timeout)
    run["loadavg_start"] = load_start
    # The floor again after the run: under shared load the better of the two is the floor.
    fl_after = floor(model_dir, device, precision, budget["seq_len"], examples)
    print(f"[{name}]   floor after the run: {fl_after}", flush=True)
    fl = {**{k: max(fl[k], fl_after[k]) for k in ("forward_tokens_per_s", "sae_examples_per_s",
                                                  "floor_train_tokens_per_s")},
          "sae_floor_examples": examples, "before": fl, "after": fl_after}
    print(f"[{name}]   rc {run['rc']}, {run['wall_s']} s, peak RSS "
          f"{run['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    if run["rc"]:
        print("\n".join(run["tail"]), flush=True)
    train = run["stages"].get("train")
    result = {"model": f"pythia-{name}-shaped", "arch": {**ARCHS[name], **COMMON_ARCH},
              "budget": budget, "device": device, "precision": precision,
              "command": " ".join(args[1:]), "dry_run": dry, "floor": fl, "run": run}
    train_task = next((v for k, v in run["tasks_seconds"].items() if k.startswith("train")), None)
    if train_task and train:  # the training task's wall time (first to last log line)
        # tokens TRAINED (the last progress line), not the budget: a one-pass stream drops
        # a partial last batch (masked special tokens make the stream shorter than planned)
        result["train_task_s"] = train_task
        result["trained_tokens"] = train["done"]
        result["train_wall_tokens_per_s"] = round(train["done"] / train_task, 1)
    steady = run["steady_tokens_per_s"].get("train")
    if steady:
        result["stream_steady_fraction_of_floor"] = round(
            steady / fl["floor_train_tokens_per_s"], 3)
    if train and train["unit"] == "tokens":
        frac = train["rate"] / fl["floor_train_tokens_per_s"]
        if train_task:
            result["stream_wall_fraction_of_floor"] = round(
                result["train_wall_tokens_per_s"] / fl["floor_train_tokens_per_s"], 3)
        result["stream_fraction_of_floor"] = round(frac, 3)
        train_h = FULL_TRAIN_TOKENS / train["rate"] / 3600
        ev = run["stages"].get("eval")
        lg = run["stages"].get("log")
        eval_h = sum(FULL_EVAL_TOKENS / s["rate"] / 3600 for s in (ev, lg)
                     if s and s["unit"] == "tokens" and s["rate"] > 0)
        result["projection_hours"] = {"train_1B": round(train_h, 1),
                                      "eval_and_log_10M": round(eval_h, 1),
                                      "total": round(train_h + eval_h, 1)}
        result["projection_hours_at_floor"] = round(
            FULL_TRAIN_TOKENS / fl["floor_train_tokens_per_s"] / 3600, 1)
    return result


def table(results: list[dict]) -> str:
    head = ("| model | budget (train/eval/batch/seq) | dry-run est. s | wall s | peak RSS GiB "
            "| disk MB (peak/final) | train tok/s (progress; steady) | eval tok/s | log tok/s | floor fwd tok/s "
            "| floor SAE ex/s | floor train tok/s | stream / floor (progress; task wall; steady) | 1B-token projection h "
            "| load avg (start, end) |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        run, st, fl, b = r["run"], r["run"]["stages"], r["floor"], r["budget"]

        def rate(stage: str, st: dict = st) -> str:
            s = st.get(stage)
            return f"{s['rate']:,.0f} {'' if s['unit'] == 'tokens' else s['unit']}".strip() if s else "-"

        proj = r.get("projection_hours", {})
        rows.append(
            f"| {r['model']} | {b['train_tokens']:,}/{b['eval_tokens']:,}/{b['batch_tokens']:,}/"
            f"{b['seq_len']:,} | {r['dry_run'].get('estimated_seconds', '-')} | {run['wall_s']}"
            f"{'' if run['rc'] == 0 else ' (rc ' + str(run['rc']) + ')'} "
            f"| {run['peak_rss_bytes'] / 2**30:.2f} | {run['peak_disk_bytes'] / 1e6:,.1f}/"
            f"{run['final_disk_bytes'] / 1e6:,.1f} | {rate('train')}; "
            f"{run['steady_tokens_per_s'].get('train') or '-'} | {rate('eval')} | {rate('log')} "
            f"| {fl['forward_tokens_per_s']:,.0f} | {fl['sae_examples_per_s']:,.0f} "
            f"| {fl['floor_train_tokens_per_s']:,.0f} "
            f"| {r.get('stream_fraction_of_floor', '-')}; "
            f"{r.get('stream_wall_fraction_of_floor', '-')}; "
            f"{r.get('stream_steady_fraction_of_floor', '-')} "
            f"| {proj.get('train_1B', '-')} train + {proj.get('eval_and_log_10M', '-')} eval "
            f"| {run['loadavg_start'][0]}, {run['loadavg_end'][0]} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="70m,160m")
    parser.add_argument("--quick", action="store_true", help="tiny budgets (smoke test)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="float32",
                        choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--train-tokens", type=int, help="override the budget (every model)")
    parser.add_argument("--eval-tokens", type=int)
    parser.add_argument("--batch-tokens", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for the floor (default: torch's)")
    parser.add_argument("--timeout", type=float, default=3600,
                        help="kill a run after this many seconds (reported as rc -9)")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--logs", type=Path, help="keep the runs' logs in this folder")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mlsae-scale-"))
    results = []
    try:
        for name in args.models.split(","):
            budget = dict((QUICK if args.quick else BUDGETS)[name])
            for key in ("train_tokens", "eval_tokens", "batch_tokens", "seq_len"):
                if getattr(args, key) is not None:
                    budget[key] = getattr(args, key)
            results.append(bench_model(name, budget, args.device, args.precision, work,
                                       args.logs, args.timeout))
            shutil.rmtree(work / f"warehouse-{name}", ignore_errors=True)
            shutil.rmtree(work / f"pythia-{name}-shaped", ignore_errors=True)
            if args.json_out:  # after each model, so a later crash keeps the figures
                args.json_out.write_text(json.dumps(
                    {"results": results, "loadavg": loadavg(), "cpus": os.cpu_count()},
                    indent=2) + "\n")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(results))
    for r in results:
        p = r.get("projection_hours")
        if p:
            print(f"{r['model']}: streaming training at {r['stream_fraction_of_floor']:.0%} of the "
                  f"floor (goal >= 80%); full paper preset (1B train, 10M eval tokens) projected "
                  f"{p['total']:,} h on this device ({r['projection_hours_at_floor']:,} h for "
                  f"training at the floor)")
    print(f"load average now: {loadavg()} on {os.cpu_count()} CPUs")
    failed = [r["model"] for r in results if r["run"]["rc"]]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
