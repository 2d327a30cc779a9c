"""Train an MLSAE from the activation cache or a stream, with exact resume.

    out_dir/checkpoint.pt      TrainState: everything needed to continue bit-for-bit
    out_dir/sae/               the trained SAE (save_pretrained), written at the end
    out_dir/train_summary.json config, steps, tokens, rate, loss history

A run killed at any point and started again with the same arguments continues
from its last checkpoint and ends with the same parameters as an uninterrupted
run: the TrainState holds the model, Adam's moments, the dead-latent counters,
the RNG state and the data position, and every batch is a function of
(seed, position) (mlsae.sae.batches). Checkpoints are written to a temporary
file, fsynced and renamed into place, so a kill mid-write leaves the previous one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from mlsae.cache import ActivationCache, ShardArrays
from mlsae.models import resolve_device
from mlsae.progress import Progress
from mlsae.sae.batches import BatchStream, CacheWindows, DataPosition, StreamWindows
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
        saved, wanted = payload["trajectory"], _jsonable(cfg.trajectory())
        if saved != wanted:
            diff = "; ".join(f"{k}: checkpoint has {saved.get(k)!r}, asked for {wanted[k]!r}"
                             for k in wanted if saved.get(k) != wanted[k])
            raise ValueError(f"{path.parent} holds a training run with different settings "
                             f"({diff}): use a new out_dir, or delete {path} to start over")
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.dead.tokens_since_fired_M.copy_(payload["tokens_since_fired"])
        self.step, self.tokens = int(payload["step"]), int(payload["tokens"])
        self.position = DataPosition(*payload["position"])
        self.bias_initialized = bool(payload["bias_initialized"])
        self.history = list(payload["history"])
        torch.set_rng_state(payload["rng_cpu"])
        if payload["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(payload["rng_cuda"])


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


Source = ActivationCache | str | os.PathLike | Iterable[ShardArrays]


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _windows(cfg: TrainConfig, source: Source, source_layers: list[int] | None):
    """The window reader for `source` and the positions of the SAE's layers in its L axis."""
    if isinstance(source, str | os.PathLike):
        source = ActivationCache.open(source)
    layers = cfg.sae.layers
    if isinstance(source, ActivationCache):
        source_layers = source.manifest.layers
        if source.manifest.d_model != cfg.sae.d_model:
            raise ValueError(f"the cache holds d_model = {source.manifest.d_model} vectors but "
                             f"SAEConfig.d_model = {cfg.sae.d_model}: make them agree")
    elif source_layers is None:
        source_layers = layers
    missing = [layer for layer in layers if layer not in source_layers]
    if missing:
        raise ValueError(f"the SAE trains on layers {layers} but the data holds only "
                         f"{list(source_layers)}: extract the missing layers {missing} or "
                         "choose layers the data has")
    layer_pos = [list(source_layers).index(layer) for layer in layers]
    if isinstance(source, ActivationCache):
        seq_len = source.manifest.seq_len
        return CacheWindows(source, layer_pos, max(1, cfg.shuffle_tokens // seq_len),
                            cfg.seed), source
    return StreamWindows(source, layer_pos, cfg.shuffle_tokens), source


def train_sae(cfg: TrainConfig, source: Source, out_dir: str | os.PathLike,
              basis: Any = None, *, source_layers: list[int] | None = None,
              resume: bool = True, on_step: Callable[[TrainState, StepOutput], None] | None = None,
              progress_log: Callable[[str], None] | None = None) -> TrainResult:
    """Train an SAE on `source` and save it to out_dir/sae; resume from out_dir if possible.

    source: an ActivationCache (or its directory), or an iterable of ShardArrays (e.g.
      mlsae.extract.stream_activations) whose L axis holds `source_layers` (default: the
      SAE's layers). A cache is read for as many epochs as the budget needs; an iterator
      once (resuming re-reads it up to the checkpoint).
    basis: a ResidualBasis (mlsae.lens); the SAE trains on basis.to_sae(x) and its loss is
      measured there. None = the model's own basis.
    resume: continue from out_dir/checkpoint.pt when present (same settings required; the
      token budget may be raised). False starts over.
    on_step(state, step_output): called after every step (tests use it to simulate kills).
    """
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
    windows, source = _windows(cfg, source, source_layers)
    if isinstance(source, ActivationCache) and sae_cfg.data is None:
        sae_cfg = dataclasses.replace(
            sae_cfg, data=source.manifest.data,
            extra={**sae_cfg.extra, "cache": str(source.root), "cache_model": source.manifest.model})
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
    elif ckpt.exists():
        ckpt.unlink()
    resumed_from = state.step
    layers_t = torch.tensor(sae_cfg.layers, device=device)
    n_slots = len(sae_cfg.layers)
    batches = BatchStream(windows, cfg.batch_examples, cfg.seed, state.position, device)
    progress = Progress(f"train sae ({n_slots} layer{'s' * (n_slots > 1)})",
                        total=max(0, cfg.n_steps - state.step) * cfg.batch_tokens,
                        unit="tokens", every_s=cfg.log_every_s, log=progress_log)
    t0, tokens0 = time.perf_counter(), state.tokens
    last_saved = state.step
    model.train()
    while state.step < cfg.n_steps:
        batch = batches.next_batch()
        if batch is None:
            break
        x_ND = batch.x_ND
        if basis is not None:
            x_ND = basis.to_sae(x_ND, layers_t[batch.slot_N]).to(torch.float32)
        if not state.bias_initialized:
            model.init_bias(x_ND, cfg.geometric_median_iters)
            state.bias_initialized = True
        out_step = train_step(model, state.optimizer, x_ND, batch.slot_N, n_slots,
                              dead=state.dead, n_tokens=cfg.batch_tokens,
                              compute_dtype=compute_dtype)
        state.step += 1
        state.tokens += cfg.batch_tokens
        state.position = batch.position
        state.history.append({"step": state.step, "tokens": state.tokens,
                              "loss": out_step.loss, "fvu": out_step.fvu, "auxk": out_step.auxk,
                              "l0": out_step.l0, "dead_fraction": out_step.dead_fraction})
        progress.update(cfg.batch_tokens, loss=out_step.loss, fvu=out_step.fvu,
                        l0=out_step.l0, dead=out_step.dead_fraction)
        if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
            state.save(ckpt, cfg)
            last_saved = state.step
        if on_step is not None:
            on_step(state, out_step)
    if state.step != last_saved or not ckpt.exists():
        state.save(ckpt, cfg)
    elapsed = time.perf_counter() - t0
    rate = (state.tokens - tokens0) / elapsed if state.tokens > tokens0 and elapsed > 0 else 0.0
    last = state.history[-1] if state.history else {}
    progress.close(**{k: last[k] for k in ("loss", "fvu", "l0", "dead_fraction") if k in last})
    model.eval()
    sae_dir = model.save_pretrained(out / SAE_DIR)
    summary = {"train_config": _jsonable(cfg.to_dict()), "steps": state.step,
               "tokens": state.tokens, "tokens_per_s": rate, "resumed_from_step": resumed_from,
               "data_exhausted": batches.exhausted, "history": state.history}
    tmp = out / f".{SUMMARY}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp, out / SUMMARY)
    return TrainResult(model, sae_dir, state.step, state.tokens, state.history, rate,
                       resumed_from, batches.exhausted)
