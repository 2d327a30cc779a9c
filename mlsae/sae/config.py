"""Configuration of an MLSAE (SAEConfig) and of its training run (TrainConfig).

Units: a TOKEN is one position of one sequence; it gives one EXAMPLE per trained
layer (SPEC 1), so a multi-layer SAE on L layers sees L examples per token and a
single-layer SAE one. Token budgets, batch sizes and the dead-latent window are
counted in tokens, as in the paper (131,072 tokens per step, 10M-token dead
window), whatever the number of layers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

AUTOCAST_DTYPES = ("float16", "bfloat16")


def _positive_int(owner: str, name: str, value: Any, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}.{name} must be a positive integer, got {value!r}{hint}")


@dataclass
class SAEConfig:
    """What the autoencoder is (SPEC 2) and what it was trained on (the record)."""

    d_model: int
    """Residual width d of the model (input size of the SAE)."""
    n_layers: int
    """Number of transformer blocks of the model (block indices 0..n_layers-1)."""
    layers: list[int] | None = None
    """Blocks whose outputs the SAE is trained on. None = every block (a multi-layer SAE);
    [l] = the single-layer baseline. Resolved to an explicit list on construction."""
    expansion_factor: int = 64
    """R: n_latents = R * d_model (reference default 64)."""
    n_latents: int | None = None
    """Number of latents n; None = expansion_factor * d_model. Set it to override R."""
    k: int = 32
    """Active latents per example (TopK)."""
    k_aux: int = 256
    """Latents used by the AuxK loss, chosen among the dead ones (reference 256)."""
    aux_coef: float = 1 / 32
    """Weight of the AuxK term in the loss; 0 disables AuxK."""
    dead_tokens: int = 10_000_000
    """A latent is dead when it has not fired on any of the last this-many training tokens."""
    act_threshold: float = 1e-3
    """A latent fires on an example when its post-ReLU activation exceeds this."""
    standardize: bool = True
    """Per-vector standardization z = (x - mean) / (std + 1e-5) before encoding (SPEC 2)."""
    model: str = "embedded"
    """The language model the SAE belongs to ("embedded", a local path or a hub id)."""
    lens: str | None = None
    """The basis the SAE was trained in: None = the model's own (no lens), else the lens spec
    or name (e.g. "tuned-lens:embedded"); metrics are always in the model's basis."""
    data: dict | None = None
    """The training data's DataConfig as a dict (a record; not used by the model)."""
    extra: dict = field(default_factory=dict)
    """Free-form record (e.g. the training config, the cache path)."""

    def __post_init__(self) -> None:
        _positive_int("SAEConfig", "d_model", self.d_model)
        _positive_int("SAEConfig", "n_layers", self.n_layers)
        _positive_int("SAEConfig", "expansion_factor", self.expansion_factor,
                      " (n_latents = expansion_factor * d_model)")
        if self.n_latents is None:
            self.n_latents = self.expansion_factor * self.d_model
        _positive_int("SAEConfig", "n_latents", self.n_latents)
        if self.layers is None:
            self.layers = list(range(self.n_layers))
        self.layers = [int(layer) for layer in self.layers]
        if not self.layers:
            raise ValueError("SAEConfig.layers is empty: give block indices, e.g. [3] for a "
                             "single-layer SAE, or None for every block")
        bad = [layer for layer in self.layers if not 0 <= layer < self.n_layers]
        if bad:
            raise ValueError(f"SAEConfig.layers has {bad[0]}, out of range: the model has "
                             f"{self.n_layers} blocks, so layers must be in 0..{self.n_layers - 1}")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"SAEConfig.layers {self.layers} repeats a block: list each once")
        _positive_int("SAEConfig", "k", self.k)
        if self.k > self.n_latents:
            raise ValueError(f"SAEConfig.k = {self.k} exceeds n_latents = {self.n_latents}: "
                             "lower k or raise expansion_factor")
        _positive_int("SAEConfig", "k_aux", self.k_aux)
        if self.k_aux > self.n_latents:
            raise ValueError(f"SAEConfig.k_aux = {self.k_aux} exceeds n_latents = "
                             f"{self.n_latents}: use k_aux <= n_latents (reference: 256, "
                             "or about d_model / 2)")
        if not self.aux_coef >= 0:
            raise ValueError(f"SAEConfig.aux_coef must be >= 0 (0 disables AuxK), got "
                             f"{self.aux_coef!r}")
        _positive_int("SAEConfig", "dead_tokens", self.dead_tokens)
        if not self.act_threshold >= 0:
            raise ValueError(f"SAEConfig.act_threshold must be >= 0, got {self.act_threshold!r}")

    @property
    def n_train_layers(self) -> int:
        """Examples per token: the number of layers the SAE is trained on."""
        return len(self.layers)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> SAEConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown SAEConfig fields {unknown}: this config.json was written "
                             "by a newer mlsae; upgrade mlsae to load it")
        return cls(**raw)


@dataclass
class TrainConfig:
    """How an SAE is trained (SPEC 2 defaults; sizes in tokens, see the module docstring)."""

    sae: SAEConfig
    """The autoencoder to train."""
    train_tokens: int = 2_000_000
    """Token budget: training stops after this many tokens (the reference used 1B). May be
    raised when resuming a finished run to train further."""
    batch_tokens: int = 4096
    """Tokens per optimizer step (examples per step = batch_tokens * len(layers));
    the reference used 131,072."""
    lr: float = 1e-4
    """Adam learning rate (constant)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    adam_eps: float = 6.25e-10
    """Adam epsilon."""
    seed: int = 0
    """Seed of the initialization and of the data order."""
    shuffle_tokens: int = 65_536
    """Tokens per shuffle window: whole sequences (a fresh random order each epoch) are read
    into a window and its (token, layer) examples are shuffled together. Memory: one window,
    about shuffle_tokens * (layers read) * d_model * 2 bytes for float16 activations (shared
    by all SAEs of a train_many pass)."""
    shuffle: bool = True
    """Shuffle the training data: the cache's sequence order (a fresh permutation each epoch)
    and the rows within each window. False reads sequences in their stored/streamed order and
    the rows of each window in order (token-major, then layer), so a stream and a cache of the
    same data give the same batches."""
    data_seed: int | None = None
    """Seed of the cache's sequence order (None: `seed`). SAEs trained in one pass over a cache
    (train_many) share the order, so they must agree on it; the rows within each window are
    always permuted with `seed`."""
    checkpoint_every: int = 200
    """Write the exact-resume checkpoint every this many steps (and at the end); 0 = only at
    the end."""
    checkpoint_seconds: float = 0.0
    """Also write it once this many seconds passed since the last write (0 = off): bounds
    the work a kill loses however long a step takes."""
    geometric_median_iters: int = 100
    """Weiszfeld iterations for the decoder bias initialization (first batch)."""
    device: str = "auto"
    """"auto" (CUDA when available, else CPU), "cpu", "cuda", ..."""
    autocast: str | None = None
    """Run the encoder matmul in "bfloat16" or "float16" (GPU); None = the parameter dtype
    (float32). Selection and gradients stay in float32."""
    log_every_s: float = 5.0
    """Seconds between progress lines."""

    def __post_init__(self) -> None:
        if isinstance(self.sae, dict):  # from JSON / Prefect parameters
            self.sae = SAEConfig.from_dict(self.sae)
        if not isinstance(self.sae, SAEConfig):
            raise ValueError("TrainConfig.sae must be an SAEConfig (or its dict)")
        _positive_int("TrainConfig", "train_tokens", self.train_tokens)
        _positive_int("TrainConfig", "batch_tokens", self.batch_tokens)
        _positive_int("TrainConfig", "shuffle_tokens", self.shuffle_tokens)
        _positive_int("TrainConfig", "geometric_median_iters", self.geometric_median_iters)
        if self.batch_tokens > self.train_tokens:
            raise ValueError(f"TrainConfig.batch_tokens = {self.batch_tokens} exceeds "
                             f"train_tokens = {self.train_tokens}: lower the batch or raise "
                             "the budget")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr!r}")
        if not self.adam_eps > 0:
            raise ValueError(f"TrainConfig.adam_eps must be > 0, got {self.adam_eps!r}")
        self.betas = tuple(float(b) for b in self.betas)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"TrainConfig.betas must be two numbers in [0, 1), got {self.betas}")
        if isinstance(self.checkpoint_every, bool) or self.checkpoint_every < 0:
            raise ValueError("TrainConfig.checkpoint_every must be >= 0 steps (0 = only at the "
                             f"end), got {self.checkpoint_every!r}")
        if isinstance(self.checkpoint_seconds, bool) or not self.checkpoint_seconds >= 0:
            raise ValueError("TrainConfig.checkpoint_seconds must be >= 0 (0 = off), got "
                             f"{self.checkpoint_seconds!r}")
        if not isinstance(self.shuffle, bool):
            raise ValueError(f"TrainConfig.shuffle must be True or False, got {self.shuffle!r}")
        if self.data_seed is not None and (isinstance(self.data_seed, bool)
                                           or not isinstance(self.data_seed, int)):
            raise ValueError("TrainConfig.data_seed must be an integer or None (None: seed), "
                             f"got {self.data_seed!r}")
        if self.autocast is not None and self.autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"TrainConfig.autocast must be None or one of {AUTOCAST_DTYPES}, "
                             f"got {self.autocast!r}")

    @property
    def batch_examples(self) -> int:
        """Examples per optimizer step."""
        return self.batch_tokens * self.sae.n_train_layers

    @property
    def n_steps(self) -> int:
        """Optimizer steps in the budget (the last partial batch is dropped)."""
        return self.train_tokens // self.batch_tokens

    # Fields that change the trajectory: a checkpoint written under different ones is refused.
    TRAJECTORY = ("sae", "batch_tokens", "lr", "betas", "adam_eps", "seed", "shuffle_tokens",
                  "geometric_median_iters", "autocast")

    # Also trajectory fields, but recorded only when not at their default (so checkpoints
    # written before they existed still resume).
    OPTIONAL_TRAJECTORY = {"shuffle": True, "data_seed": None}

    def trajectory(self) -> dict:
        raw = dataclasses.asdict(self)
        out = {name: raw[name] for name in self.TRAJECTORY}
        out.update({name: raw[name] for name, default in self.OPTIONAL_TRAJECTORY.items()
                    if raw[name] != default})
        return out

    @property
    def order_seed(self) -> int:
        """Seed of the cache's sequence order."""
        return self.seed if self.data_seed is None else self.data_seed

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
