"""A small warehouse for the explorer's tests (tests/test_serve_*.py), built once per test
session with the pipeline's own steps on the embedded model: train an MLSAE briefly into
<warehouse>/autoencoders/<sae_id> (where `mlsae run` puts it), evaluate it (with the
splice), log its latents on held-out text."""

from __future__ import annotations

from pathlib import Path

SAE_ID = "serve-x4-k8"
LENS_SAE_ID = "serve-x4-k8-lens"
"""The same recipe trained in the embedded tuned lens' basis (saes.lens = "embedded")."""
_BUILT: dict[str, Path] = {}


def build_serve_warehouse(tmp_path_factory) -> Path:
    """The warehouse directory (built on the first call of the session, then reused)."""
    if "root" not in _BUILT:
        _BUILT["root"] = _build(tmp_path_factory.mktemp("serve") / "mlsae-data")
    return _BUILT["root"]


def _build(root: Path) -> Path:
    from mlsae.lens import load_basis
    from mlsae.models import load_model
    from mlsae.warehouse import init_warehouse

    init_warehouse(root)
    loaded = load_model("embedded", device="cpu")
    _add_sae(root, loaded, SAE_ID, None)
    basis = load_basis("embedded", loaded)
    _add_sae(root, loaded, LENS_SAE_ID, basis, lens="embedded")
    return root


def _add_sae(root: Path, loaded, sae_id: str, basis, lens: str | None = None) -> None:
    from mlsae.data import DataConfig
    from mlsae.extract import ExtractConfig, stream_activations
    from mlsae.hooks import n_layers
    from mlsae.latents import log_latents, write_layer_metrics
    from mlsae.sae.config import SAEConfig, TrainConfig
    from mlsae.sae.evaluate import evaluate_sae
    from mlsae.sae.train import train_sae
    from mlsae.warehouse import autoencoder_dir

    sae_cfg = SAEConfig(d_model=loaded.model.config.hidden_size, n_layers=n_layers(loaded.model),
                        expansion_factor=4, k=8, k_aux=8, model=loaded.name, lens=lens)
    train_data = DataConfig(split="train", seq_len=64, max_sequences=32)
    stream = stream_activations(ExtractConfig(model="embedded", data=train_data, device="cpu",
                                              dtype="float32", shard_sequences=16), loaded)
    trained = train_sae(TrainConfig(sae=sae_cfg, train_tokens=2048, batch_tokens=256, lr=1e-3,
                                    device="cpu", checkpoint_every=10_000),
                        stream, autoencoder_dir(root, sae_id), basis=basis,
                        progress_log=lambda _: None)
    test_data = DataConfig(split="test", seq_len=64, max_sequences=6)
    metrics = evaluate_sae(trained.sae, loaded, test_data, basis, max_tokens=128)
    log_latents(trained.sae_dir, loaded, test_data, root, sae_id, basis=basis,
                train_tokens=2048, progress_log=lambda _: None)
    write_layer_metrics(root, sae_id, metrics)
