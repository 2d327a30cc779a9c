"""The library configs a pipeline plan turns into (one place, used by validation and training).

The budget-dependent choices live here, so validation builds exactly the
configs training will use and the library's own checks run before any compute.
"""

from __future__ import annotations

from typing import Any

REFERENCE_K_AUX = 256
REFERENCE_DEAD_TOKENS = 10_000_000
BATCH_TOKENS = 4096
CHECKPOINTS_PER_RUN = 10


def sae_config(spec: dict[str, Any], model: dict[str, Any], data: str, lens: str | None):
    """SAEConfig of one planned autoencoder.

    Two reference defaults are scaled to small runs: k_aux (256) never exceeds
    half the dictionary, and the dead-latent window (10M tokens) never exceeds a
    fifth of the training budget, so AuxK can revive latents in a short run too.
    """
    from mlsae.sae import SAEConfig

    n_latents = spec["expansion_factor"] * model["d_model"]
    return SAEConfig(
        d_model=model["d_model"], n_layers=model["n_layers"], layers=list(spec["layers"]),
        expansion_factor=spec["expansion_factor"], k=spec["k"],
        k_aux=max(1, min(REFERENCE_K_AUX, n_latents // 2)),
        dead_tokens=max(1, min(REFERENCE_DEAD_TOKENS, spec.get("train_tokens", 0) // 5 or
                               REFERENCE_DEAD_TOKENS)),
        model=model["name"], lens=lens,
        extra={"sae_id": spec["sae_id"], "role": spec["role"], "data": data})


def train_config(spec: dict[str, Any], model: dict[str, Any], data: str, lens: str | None,
                 train_tokens: int, seed: int, lr: float, device: str,
                 batch_tokens: int = BATCH_TOKENS):
    """TrainConfig of one planned autoencoder: the budget, the learning rate, the tokens
    per optimizer step (at most the budget), ~10 resume checkpoints per run.

    A single-layer baseline gets its own seed (seed + 1 + its layer): with the MLSAE's
    seed it would start from the very same decoder, and MMCS between the two
    dictionaries would measure the shared initialisation, not what they learned.
    """
    from mlsae.sae import TrainConfig

    if spec["role"] == "baseline":
        seed = seed + 1 + spec["layers"][0]

    batch_tokens = min(batch_tokens, train_tokens)
    n_steps = max(1, train_tokens // batch_tokens)
    return TrainConfig(
        sae=sae_config({**spec, "train_tokens": train_tokens}, model, data, lens),
        train_tokens=train_tokens, batch_tokens=batch_tokens, lr=lr, seed=seed, device=device,
        checkpoint_every=max(1, n_steps // CHECKPOINTS_PER_RUN))
