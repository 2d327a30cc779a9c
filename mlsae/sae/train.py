"""Train MLSAEs from the activation cache or a stream, several in one pass, with exact resume.

    out_dir/checkpoint.pt      TrainState: everything needed to continue bit-for-bit
    out_dir/sae/               the trained SAE (save_pretrained), written at the end
    out_dir/train_summary.json config, steps, tokens, rate, loss history

`train_many` feeds every SAE of a run (an MLSAE, single-layer baselines, other R/k,
lens bases) from ONE pass over the data: each window of activations is read (or
computed by the model, for an mlsae.extract.ActivationStream) once and every SAE
takes its own rows from it. `train_sae` is train_many of one.

A run killed at any point and started again with the same arguments continues
from its last checkpoints and ends with the same parameters as an uninterrupted
run: each TrainState holds the model, Adam's moments, the dead-latent counters and
the data position, and every batch is a function of (seed, position)
(mlsae.sae.batches). Training draws no random numbers after the initialization
(which uses its own generator seeded with TrainConfig.seed), so SAEs trained
together do not share any RNG and their order does not matter. Checkpoints are
written to a temporary file, fsynced and renamed into place, so a kill mid-write
leaves the previous one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from mlsae.cache import ActivationCache, ShardArrays
from mlsae.extract import ActivationStream
from mlsae.models import resolve_device
from mlsae.progress import Progress
from mlsae.sae.batches import (
    CacheWindows,
    DataPosition,
    RowSampler,
    SequenceWindows,
    StreamWindows,
    WindowCursor,
)
from mlsae.sae.config import TrainConfig
from mlsae.sae.model import MLSAE
from mlsae.sae.step import DeadCounter, StepOutput, make_optimizer, train_step

CHECKPOINT = "checkpoint.pt"
SAE_DIR = "sae"
SUMMARY = "train_summary.json"
CHECKPOINT_FORMAT = "mlsae-train-state"


@dataclass
class TrainState:
    """Everything a resumed run needs; `save`/`load` round-trip it exactly."""

    model: MLSAE
    optimizer: torch.optim.Optimizer
    dead: DeadCounter
    step: int = 0
    tokens: int = 0
    """Tokens trained on so far (step * batch_tokens)."""
    position: DataPosition = DataPosition()
    """Where the next batch starts in the data."""
    bias_initialized: bool = False
    history: list[dict] = field(default_factory=list)
    """One record per step: step, tokens, loss, fvu, auxk, l0, dead_fraction."""

    def save(self, path: Path, cfg: TrainConfig) -> None:
        payload = {
            "format": CHECKPOINT_FORMAT, "train_config": _jsonable(cfg.to_dict()),
            "trajectory": _jsonable(cfg.trajectory()), "step": self.step, "tokens": self.tokens,
            "position": list(self.position), "bias_initialized": self.bias_initialized,
            "history": self.history, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "tokens_since_fired": self.dead.tokens_since_fired_M,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load(self, path: Path, cfg: TrainConfig) -> None:
        payload = torch.load(path, map_location=self.model.W_enc_MD.device, weights_only=True)
        if payload.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not an mlsae training checkpoint: use another out_dir")
        saved, wanted = _portable(payload["trajectory"]), _portable(_jsonable(cfg.trajectory()))
        if saved != wanted:
            diff = "; ".join(f"{k}: checkpoint has {saved.get(k)!r}, asked for {wanted.get(k)!r}"
                             for k in {**saved, **wanted} if saved.get(k) != wanted.get(k))
            raise ValueError(f"{path.parent} holds a training run with different settings "
                             f"({diff}): use a new out_dir, or delete {path} to start over")
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.dead.tokens_since_fired_M.copy_(payload["tokens_since_fired"])
        self.step, self.tokens = int(payload["step"]), int(payload["tokens"])
        self.position = DataPosition(*payload["position"])
        self.bias_initialized = bool(payload["bias_initialized"])
        self.history = list(payload["history"])
        # rng_cpu / rng_cuda are kept in the format but not restored: training draws nothing
        # from the global RNG, and with several SAEs per process restoring one would be wrong.


class TrainResult(NamedTuple):
    sae: MLSAE
    sae_dir: Path
    """out_dir/sae: load with MLSAE.from_pretrained."""
    steps: int
    tokens: int
    history: list[dict]
    tokens_per_s: float
    """Mean training rate of this call (0 when nothing was left to do)."""
    resumed_from_step: int
    """Step of the checkpoint this call started from (0: a fresh run)."""
    data_exhausted: bool
    """True when a one-pass stream ran out before the token budget."""


class TrainingInterrupted(RuntimeError):
    """Training stopped at a step boundary because should_stop() said so; every SAE's
    checkpoint is written, and running the same command again continues exactly."""


Source = ActivationCache | ActivationStream | str | os.PathLike | Iterable[ShardArrays]
SHARED_FIELDS = ("train_tokens", "batch_tokens", "shuffle_tokens", "shuffle")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _portable(trajectory: dict) -> dict:
    """A trajectory without the activation cache's local path (sae.extra.cache): the same
    cache (same data, sae.data) on another machine or scratch directory continues the same
    run, so a checkpoint published to a bucket resumes anywhere."""
    sae = dict(trajectory.get("sae") or {})
    sae["extra"] = {k: v for k, v in (sae.get("extra") or {}).items() if k != "cache"}
    return {**trajectory, "sae": sae}


@dataclass
class _Member:
    """One SAE of a pass."""

    cfg: TrainConfig
    out: Path
    basis: Any
    state: TrainState
    sampler: RowSampler
    device: torch.device
    compute_dtype: torch.dtype | None
    layers_t: torch.Tensor
    resumed_from: int
    tokens0: int
    last_saved: int
    verified: bool = False
    saved_at: float = dataclasses.field(default_factory=lambda: time.perf_counter())
    """When its checkpoint was last written (or training started)."""
    """Its checkpoint's data position was checked against the shared one."""

    @property
    def ckpt(self) -> Path:
        return self.out / CHECKPOINT

    @property
    def n_slots(self) -> int:
        return len(self.cfg.sae.layers)

    def save(self) -> None:
        self.state.save(self.ckpt, self.cfg)
        self.last_saved = self.state.step
        self.saved_at = time.perf_counter()

    def checkpoint_due(self) -> bool:
        cfg = self.cfg
        return bool((cfg.checkpoint_every and self.state.step % cfg.checkpoint_every == 0)
                    or (cfg.checkpoint_seconds
                        and time.perf_counter() - self.saved_at >= cfg.checkpoint_seconds))


def _open_source(source: Source, source_layers: list[int] | None, layers: list[int]):
    """(source, its layers in L order or None, d_model or None, seq_len or None, record)."""
    if isinstance(source, str | os.PathLike):
        source = ActivationCache.open(source)
    if isinstance(source, ActivationCache):
        m = source.manifest
        return source, m.layers, m.d_model, m.seq_len, (
            m.data, {"cache": str(source.root), "cache_model": m.model})
    if isinstance(source, ActivationStream):
        return source, source.layers, source.d_model, source.seq_len, (
            source.data_record(), {"stream_model": source.model_name})
    return source, source_layers if source_layers is not None else layers, None, None, None


def _check_shared(cfgs: list[TrainConfig], cache: bool) -> None:
    fields = SHARED_FIELDS + (("order_seed",) if cache else ())
    for name in fields:
        values = [getattr(c, name) for c in cfgs]
        if len(set(values)) > 1:
            what = "data_seed (or seed)" if name == "order_seed" else name
            raise ValueError(f"the SAEs of one pass must share TrainConfig.{what}: got "
                             f"{values}; one forward pass feeds them all, so set it the same in "
                             "every config" + (" (data_seed fixes the cache's order without "
                                               "changing each SAE's seed)"
                                               if name == "order_seed" else ""))


def _prepare_member(cfg: TrainConfig, out_dir, basis, record, source_layers: list[int],
                    d_model: int | None, resume: bool, log: Callable[[str], None]) -> _Member:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sae_cfg = cfg.sae
    basis_name = getattr(basis, "name", None) if basis is not None else None
    if basis_name in (None, "none"):
        if sae_cfg.lens not in (None, "none"):
            raise ValueError(f"SAEConfig.lens is {sae_cfg.lens!r} but no basis was passed: pass "
                             "basis=mlsae.lens.load_basis(...) or set lens=None")
        basis = None
    elif sae_cfg.lens is None:
        sae_cfg = dataclasses.replace(sae_cfg, lens=basis_name)
    layers = sae_cfg.layers
    missing = [layer for layer in layers if layer not in source_layers]
    if missing:
        raise ValueError(f"the SAE trains on layers {layers} but the data holds only "
                         f"{list(source_layers)}: extract the missing layers {missing} or "
                         "choose layers the data has")
    if d_model is not None and d_model != sae_cfg.d_model:
        raise ValueError(f"the data holds d_model = {d_model} vectors but "
                         f"SAEConfig.d_model = {sae_cfg.d_model}: make them agree")
    if record is not None and sae_cfg.data is None:
        sae_cfg = dataclasses.replace(sae_cfg, data=record[0], extra={**sae_cfg.extra, **record[1]})
    if sae_cfg is not cfg.sae:
        cfg = dataclasses.replace(cfg, sae=sae_cfg)
    device = resolve_device(cfg.device)
    compute_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.autocast or "")
    model = MLSAE(sae_cfg, seed=cfg.seed, device=device)
    state = TrainState(model, make_optimizer(model, cfg.lr, cfg.betas, cfg.adam_eps),
                       DeadCounter(sae_cfg.n_latents, device))
    ckpt = out / CHECKPOINT
    if resume and ckpt.exists():
        state.load(ckpt, cfg)
        log(f"{out}: continued from the checkpoint at step {state.step} of {cfg.n_steps}")
    elif ckpt.exists():
        ckpt.unlink()
    return _Member(cfg, out, basis, state, RowSampler([], cfg.seed, cfg.shuffle), device,
                   compute_dtype, torch.tensor(layers, device=device), state.step,
                   state.tokens, state.step)


def _finish(m: _Member, rate_elapsed: float, exhausted: bool) -> TrainResult:
    state, cfg, out = m.state, m.cfg, m.out
    if state.step != m.last_saved or not m.ckpt.exists():
        m.save()
    done = state.tokens - m.tokens0
    rate = done / rate_elapsed if done > 0 and rate_elapsed > 0 else 0.0
    state.model.eval()
    sae_dir = out / SAE_DIR
    if done > 0 or not ((sae_dir / "config.json").exists() and any(sae_dir.glob("*.safetensors"))):
        sae_dir = state.model.save_pretrained(sae_dir)
    # else a rerun of a finished run: the saved weights stay as they are (saving again would
    # record this run's source path in config.json, changing a file that a warehouse in a
    # bucket already holds and the latent log's fingerprint pinned)
    if not (done == 0 and (out / SUMMARY).exists()):
        # (a rerun of a finished run keeps the summary of the session that trained it: its
        # rate is the run's training time, the report's runtime; 0 tokens/s would erase it)
        summary = {"train_config": _jsonable(cfg.to_dict()), "steps": state.step,
                   "tokens": state.tokens, "tokens_per_s": rate,
                   "resumed_from_step": m.resumed_from, "data_exhausted": exhausted,
                   "history": state.history}
        tmp = out / f".{SUMMARY}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(summary, indent=1) + "\n")
        os.replace(tmp, out / SUMMARY)
    return TrainResult(state.model, sae_dir, state.step, state.tokens, state.history, rate,
                       m.resumed_from, exhausted)


def train_many(cfgs: list[TrainConfig], source: Source, out_dirs: list[str | os.PathLike],
               bases: list[Any] | None = None, *, source_layers: list[int] | None = None,
               resume: bool = True,
               on_step: Callable[[int, TrainState, StepOutput], None] | None = None,
               progress_log: Callable[[str], None] | None = None,
               should_stop: Callable[[], bool] | None = None) -> list[TrainResult]:
    """Train several SAEs on ONE pass over `source`; SAE i is saved to out_dirs[i]/sae.

    cfgs: one TrainConfig per SAE (any layers, R, k, seed, optimizer settings); they must
      share train_tokens, batch_tokens, shuffle_tokens and shuffle (and, on a cache, the
      sequence order: data_seed, default seed). Every SAE takes batch_tokens tokens per step
      from the same window, its own rows (its layers' vectors of each unmasked token)
      permuted with its own seed, so train_many([cfg], s) == train_sae(cfg, s) exactly, and
      each SAE ends as if it had been trained alone on the same source.
    source: an ActivationCache (or its directory; read for as many epochs as needed), an
      mlsae.extract.ActivationStream (one pass; the model runs once per window for all
      SAEs, and a resumed run restarts it at the checkpoint's window without running the
      model on earlier ones), or any iterable of ShardArrays whose L axis holds
      `source_layers` (default: the union of the SAEs' layers in the first SAE's order;
      resuming re-reads it up to the checkpoint).
    bases: one ResidualBasis (mlsae.lens) or None per SAE; the SAE trains on
      basis.to_sae(x) and its loss is measured there.
    resume: continue each SAE from out_dirs[i]/checkpoint.pt when present (same settings
      required; the token budget may be raised). If the checkpoints are at different steps
      (a kill between two writes), the pass restarts at the smallest step and SAEs that are
      ahead skip steps until it catches up, so every SAE still ends bit-identical.
    on_step(i, state, step_output): called after SAE i's every step (tests simulate kills).
    should_stop(): checked after every step of the pass; when true, every checkpoint is
      written and TrainingInterrupted is raised (rerun the same call to continue).

    Memory: one window of activations, about shuffle_tokens x (layers any SAE uses) x
    d_model x storage bytes (2 for float16) plus the masked tokens of its sequences (a
    stream of whole shards: up to one shard more), shared by all SAEs; plus per SAE an
    int64 permutation of shuffle_tokens x len(layers) and its batch.
    """
    cfgs = list(cfgs)
    out_dirs = [Path(d) for d in out_dirs]
    if not cfgs:
        raise ValueError("train_many needs at least one TrainConfig")
    if len(out_dirs) != len(cfgs):
        raise ValueError(f"got {len(cfgs)} configs but {len(out_dirs)} out_dirs: one each")
    if len({d.resolve() for d in out_dirs}) != len(out_dirs):
        raise ValueError(f"out_dirs must differ (each SAE has its own checkpoint): {out_dirs}")
    bases = list(bases) if bases is not None else [None] * len(cfgs)
    if len(bases) != len(cfgs):
        raise ValueError(f"got {len(cfgs)} configs but {len(bases)} bases: one each (or None)")
    union = list(dict.fromkeys(layer for c in cfgs for layer in c.sae.layers))
    source, src_layers, d_model, seq_len, record = _open_source(source, source_layers, union)
    _check_shared(cfgs, isinstance(source, ActivationCache))
    log = progress_log or (lambda line: print(line, file=sys.stderr, flush=True))
    members = [_prepare_member(c, d, b, record, list(src_layers), d_model, resume, log)
               for c, d, b in zip(cfgs, out_dirs, bases, strict=True)]

    # One window holds the layers any SAE uses, in the source's order.
    needed = sorted({list(src_layers).index(layer) for c in cfgs for layer in c.sae.layers})
    read_pos = None if needed == list(range(len(src_layers))) else needed
    for m in members:
        pos = [needed.index(list(src_layers).index(layer)) for layer in m.cfg.sae.layers]
        m.sampler = RowSampler(pos, m.cfg.seed, m.cfg.shuffle)
    cfg0 = members[0].cfg
    if isinstance(source, ActivationCache):
        windows = CacheWindows(source, read_pos, max(1, cfg0.shuffle_tokens // seq_len),
                               cfg0.order_seed, cfg0.shuffle)
    elif isinstance(source, ActivationStream):
        windows = SequenceWindows(source, read_pos, max(1, cfg0.shuffle_tokens // seq_len))
    else:
        windows = StreamWindows(source, read_pos, cfg0.shuffle_tokens)

    batch_tokens, n_steps = cfg0.batch_tokens, cfg0.n_steps
    shared = min(m.state.step for m in members)
    lead = next(m for m in members if m.state.step == shared)
    e, w, off = lead.state.position
    cursor = WindowCursor(windows, DataPosition(e, w, off // lead.n_slots))
    n_saes = len(members)
    desc = (f"train sae ({lead.n_slots} layer{'s' * (lead.n_slots > 1)})" if n_saes == 1
            else f"train {n_saes} saes")
    progress = Progress(desc, total=n_steps * batch_tokens, unit="tokens",
                        every_s=cfg0.log_every_s, log=log, initial=shared * batch_tokens,
                        stops=False)
    t0 = time.perf_counter()
    for m in members:
        m.state.model.train()
    last_out: dict[int, StepOutput] = {}
    # Separate clocks for getting the data (the model's forward passes, for a stream) and
    # for the SAE steps, so the progress line shows each rate, not only their mix.
    data_label = "model tok/s" if isinstance(source, ActivationStream) else "read tok/s"
    data_s = steps_s = 0.0
    data_tokens = 0
    while shared < n_steps:
        for m in members:
            if m.state.step == shared and not m.verified:
                e, w, off = m.state.position
                if m.state.step > 0 and (e, w, off // m.n_slots) != tuple(cursor.position):
                    raise ValueError(
                        f"the checkpoint in {m.out} is at step {m.state.step} but at data "
                        f"position {tuple(m.state.position)}, not where the other SAEs' data is "
                        f"at that step ({tuple(cursor.position)} in tokens): were these SAEs "
                        "trained together on this source? Train them separately or start over")
                m.verified = True
        tick = time.perf_counter()
        pieces = cursor.take(batch_tokens)
        data_s += time.perf_counter() - tick
        if pieces is None:
            break
        data_tokens += batch_tokens
        tick = time.perf_counter()
        for i, m in enumerate(members):
            if m.state.step != shared:  # ahead (its checkpoint was written later): wait
                continue
            last_out[i] = _step(m, pieces, cursor.position, batch_tokens)
            if on_step is not None:
                on_step(i, m.state, last_out[i])
        steps_s += time.perf_counter() - tick
        shared += 1
        outs = list(last_out.values())
        fields = {k: sum(getattr(o, k) for o in outs) / len(outs)
                  for k in ("loss", "fvu", "l0", "dead_fraction")} if outs else {}
        fields[data_label] = f"{data_tokens / max(data_s, 1e-9):,.0f}"
        fields["sae tok/s"] = f"{data_tokens / max(steps_s, 1e-9):,.0f}"
        progress.update(batch_tokens, **fields)
        if should_stop is not None and shared < n_steps and should_stop():
            for m in members:
                if m.state.step != m.last_saved or not m.ckpt.exists():
                    m.save()
            progress.close(**fields)
            raise TrainingInterrupted(
                f"training stopped at step {shared} of {n_steps}; the checkpoints in "
                f"{', '.join(str(m.out) for m in members)} hold it: rerun the same command "
                "to continue")
    elapsed = time.perf_counter() - t0
    outs = list(last_out.values())
    progress.close(**({k: sum(getattr(o, k) for o in outs) / len(outs)
                       for k in ("loss", "fvu", "l0", "dead_fraction")} if outs else {}))
    return [_finish(m, elapsed, cursor.exhausted) for m in members]


def _step(m: _Member, pieces, position: DataPosition, batch_tokens: int) -> StepOutput:
    state, cfg = m.state, m.cfg
    x, slot = m.sampler.rows(pieces)
    x_ND = x.to(m.device, torch.float32)
    slot_N = slot.to(m.device)
    if m.basis is not None:
        x_ND = m.basis.to_sae(x_ND, m.layers_t[slot_N]).to(torch.float32)
    if not state.bias_initialized:
        state.model.init_bias(x_ND, cfg.geometric_median_iters)
        state.bias_initialized = True
    out = train_step(state.model, state.optimizer, x_ND, slot_N, m.n_slots, dead=state.dead,
                     n_tokens=batch_tokens, compute_dtype=m.compute_dtype)
    state.step += 1
    state.tokens += batch_tokens
    state.position = DataPosition(position.epoch, position.window, position.offset * m.n_slots)
    state.history.append({"step": state.step, "tokens": state.tokens, "loss": out.loss,
                          "fvu": out.fvu, "auxk": out.auxk, "l0": out.l0,
                          "dead_fraction": out.dead_fraction})
    if m.checkpoint_due():
        m.save()
    return out


def train_sae(cfg: TrainConfig, source: Source, out_dir: str | os.PathLike,
              basis: Any = None, *, source_layers: list[int] | None = None,
              resume: bool = True, on_step: Callable[[TrainState, StepOutput], None] | None = None,
              progress_log: Callable[[str], None] | None = None,
              should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Train an SAE on `source` and save it to out_dir/sae; resume from out_dir if possible.

    train_many of one SAE (see there): source is an ActivationCache (or its directory), an
    mlsae.extract.ActivationStream, or an iterable of ShardArrays (e.g.
    mlsae.extract.stream_activations) whose L axis holds `source_layers` (default: the SAE's
    layers). A cache is read for as many epochs as the budget needs; a stream once.
    basis: a ResidualBasis (mlsae.lens); None = the model's own basis.
    resume: continue from out_dir/checkpoint.pt when present (same settings required; the
      token budget may be raised). False starts over.
    on_step(state, step_output): called after every step (tests use it to simulate kills).
    should_stop(): checked after every step; when true the checkpoint is written and
      TrainingInterrupted is raised.
    """
    hook = None if on_step is None else (lambda _i, state, out: on_step(state, out))
    (result,) = train_many([cfg], source, [out_dir], [basis], source_layers=source_layers,
                           resume=resume, on_step=hook, progress_log=progress_log,
                           should_stop=should_stop)
    return result
