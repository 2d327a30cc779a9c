"""Training: data order and masking, planted-dictionary recovery, exact resume after a kill."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from mlsae.cache import ActivationCache, CacheManifest, CacheWriter, ShardArrays
from mlsae.sae import MLSAE, SAEConfig, TrainConfig, train_sae
from mlsae.sae.batches import CacheWindows, DataPosition, RowSampler, StreamWindows, WindowCursor
from mlsae.sae.evaluate import reconstruction_metrics

D, L, T = 16, 3, 16


def _shards(n_shards=4, b=4, seed=0, dtype=np.float16, ids=False):
    """Random shards; masked tokens hold 1000 (must never reach training); with ids=True,
    dim 0 holds a unique row id and dim 1 the layer position."""
    rng = np.random.default_rng(seed)
    out, next_id = [], 0
    for _ in range(n_shards):
        acts = rng.standard_normal((b, T, L, D)).astype(np.float32)
        mask = rng.random((b, T)) > 0.2
        if ids:
            n = b * T * L
            acts[..., 0] = np.arange(next_id, next_id + n).reshape(b, T, L)
            acts[..., 1] = np.arange(L)
            next_id += n
        acts[~mask] = 1000.0
        out.append(ShardArrays(acts.astype(dtype), np.zeros((b, T), np.int32), mask))
    return out


def _cache(tmp_path, shards, layers=(0, 1, 2), dtype="float16"):
    manifest = CacheManifest(model="synthetic", layers=list(layers), d_model=D, seq_len=T,
                             dtype=dtype, model_dtype="float32", shard_sequences=4,
                             max_sequences=None, data={"source": "synthetic"})
    writer = CacheWriter(tmp_path / "cache", manifest)
    for s in shards:
        writer.write_shard(s)
    writer.finish()
    return ActivationCache.open(tmp_path / "cache")


def _batches(windows, layer_pos, seed, n_tokens, position=DataPosition()):
    """(rows, slots, position after) of consecutive batches of n_tokens tokens, as training
    draws them (WindowCursor shared by the SAEs of a pass, RowSampler per SAE)."""
    cursor, sampler = WindowCursor(windows, position), RowSampler(layer_pos, seed)
    while (pieces := cursor.take(n_tokens)) is not None:
        x, slot = sampler.rows(pieces)
        yield x.float(), slot, cursor.position


def test_batches_cover_every_unmasked_example_once_per_epoch_and_resume_exactly(tmp_path):
    shards = _shards(ids=True, dtype=np.float32)
    cache = _cache(tmp_path, shards, dtype="float32")
    n_rows = sum(int(s.mask_BT.sum()) for s in shards) * L
    windows = CacheWindows(cache, None, window_sequences=3, seed=5)
    stream = _batches(windows, [0, 1, 2], 5, n_tokens=12)
    seen, batches = [], []
    while len(seen) < 2 * n_rows:
        batch = next(stream)
        batches.append(batch)
        x, slot, _ = batch
        assert (x.abs() < 1000).all()  # masked tokens never appear
        assert torch.equal(x[:, 1].long(), slot)  # slot = layer position
        seen += x[:, 0].long().tolist()
    first, second = seen[:n_rows], seen[n_rows:2 * n_rows]
    assert sorted(first) == sorted(second) and len(set(first)) == n_rows  # each once per epoch
    assert first != second  # a new order each epoch
    assert set(batches[0][1].tolist()) == {0, 1, 2}  # shuffled across layers
    # restart from any batch's position: the same batches follow
    for i in (0, 5, len(batches) // 2):
        again = _batches(CacheWindows(cache, None, 3, 5), [0, 1, 2], 5, 12, batches[i][2])
        for j in range(i + 1, min(i + 6, len(batches))):
            assert torch.equal(next(again)[0], batches[j][0])


def test_stream_windows_select_layers_and_run_out(tmp_path):
    shards = _shards(ids=True, dtype=np.float32)
    n_tok = sum(int(s.mask_BT.sum()) for s in shards)
    batches = list(_batches(StreamWindows(iter(shards), None, window_tokens=40), [2, 0], 0,
                            n_tokens=25))
    assert sum(x.shape[0] for x, _, _ in batches) == n_tok // 25 * 25 * 2  # then it ran out
    x = torch.cat([b[0] for b in batches])
    slot = torch.cat([b[1] for b in batches])
    assert set(x[:, 1].tolist()) == {0.0, 2.0}  # layer positions 2 and 0 only
    assert torch.equal(x[:, 1][slot == 0], torch.full(((slot == 0).sum(),), 2.0))


def planted(seed: int, n_atoms=48, d=32, n_layers=3, n_seq=64, seq=64, k_true=3):
    """Sequences whose vectors at every layer are sparse combinations of ONE dictionary
    (zero-mean unit atoms, so standardization keeps them sparse), at different gains."""
    atoms = np.random.default_rng(0).standard_normal((n_atoms, d))
    atoms -= atoms.mean(1, keepdims=True)
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    shards = []
    for _ in range(n_seq // 16):
        acts = np.zeros((16, seq, n_layers, d), np.float32)
        for layer, gain in enumerate((1.0, 4.0, 16.0)[:n_layers]):
            idx = np.argsort(rng.random((16 * seq, n_atoms)), axis=1)[:, :k_true]
            coef = rng.uniform(0.5, 1.5, (16 * seq, k_true))
            acts[:, :, layer] = ((coef[..., None] * atoms[idx]).sum(1) * gain).reshape(16, seq, d)
        mask = np.ones((16, seq), bool)
        mask[:, 0] = False
        shards.append(ShardArrays(acts.astype(np.float16), np.zeros((16, seq), np.int32), mask))
    return atoms, shards


def test_planted_dictionary_is_recovered_across_layers(tmp_path):
    atoms, shards = planted(seed=1)
    cfg = TrainConfig(SAEConfig(d_model=32, n_layers=3, expansion_factor=4, k=4, k_aux=16,
                                dead_tokens=5000),
                      train_tokens=400 * 256, batch_tokens=256, lr=2e-3, checkpoint_every=0,
                      shuffle_tokens=2048)
    result = train_sae(cfg, shards, tmp_path / "run", progress_log=lambda line: None)
    W_dec = result.sae.W_dec_MD.detach().double().numpy()
    mmcs = (atoms @ W_dec.T).max(1).mean()  # each planted atom's best decoder column
    assert mmcs >= 0.9, mmcs
    _, held_out = planted(seed=2)
    metrics = reconstruction_metrics(result.sae, held_out, source_layers=[0, 1, 2])
    assert [m.layer for m in metrics] == [0, 1, 2]
    assert all(m.fvu < 0.1 for m in metrics), metrics
    assert all(m.l0 <= 4 for m in metrics)
    assert result.history[-1]["fvu"] < result.history[0]["fvu"]


def _small_cfg(**kw):
    sae = SAEConfig(d_model=D, n_layers=L, n_latents=128, k=4, k_aux=8, dead_tokens=40)
    base = dict(train_tokens=32 * 12, batch_tokens=32, lr=3e-3, checkpoint_every=4,
                shuffle_tokens=48, seed=3)
    return TrainConfig(sae, **{**base, **kw})


class Killed(Exception):
    pass


def _kill_at(step):
    def on_step(state, _out):
        if state.step == step:
            raise Killed
    return on_step


def _params(sae):
    return [p.detach().clone() for p in sae.parameters()]


@pytest.mark.parametrize("kind", ["cache", "iterator"])
def test_killed_run_resumes_to_the_same_parameters(tmp_path, kind):
    shards = _shards(n_shards=10)  # ~510 tokens: one pass covers the 384-token budget
    cache = _cache(tmp_path, shards)

    def source():
        return cache if kind == "cache" else iter(shards)

    cfg = _small_cfg()
    full = train_sae(cfg, source(), tmp_path / "full", progress_log=lambda line: None)
    assert full.steps == 12 and full.resumed_from_step == 0
    assert any(h["dead_fraction"] > 0 for h in full.history)  # AuxK and counters in play
    with pytest.raises(Killed):
        train_sae(cfg, source(), tmp_path / "killed", on_step=_kill_at(7),
                  progress_log=lambda line: None)
    resumed = train_sae(cfg, source(), tmp_path / "killed", progress_log=lambda line: None)
    assert resumed.resumed_from_step == 4 and resumed.steps == 12
    for a, b in zip(_params(full.sae), _params(resumed.sae), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert resumed.history == full.history
    summary_before = (tmp_path / "killed" / "train_summary.json").read_text()
    again = train_sae(cfg, source(), tmp_path / "killed", progress_log=lambda line: None)
    assert again.resumed_from_step == 12 and again.tokens_per_s == 0.0  # nothing left
    # ...and the summary still records the session that trained (its rate: the runtime)
    assert (tmp_path / "killed" / "train_summary.json").read_text() == summary_before
    loaded = MLSAE.from_pretrained(resumed.sae_dir)
    for a, b in zip(_params(full.sae), _params(loaded), strict=True):
        assert torch.equal(a, b)


def test_sigkilled_process_resumes_to_the_same_parameters(tmp_path):
    shards = _shards(n_shards=6)
    cache = _cache(tmp_path, shards)
    cfg = _small_cfg()
    full = train_sae(cfg, cache, tmp_path / "full", progress_log=lambda line: None)
    cfg_json = json.dumps(cfg.to_dict())
    script = textwrap.dedent(f"""
        import json, os, signal, torch
        torch.set_num_threads(1)
        from mlsae.sae import TrainConfig, train_sae
        cfg = TrainConfig(**json.loads({cfg_json!r}))
        def on_step(state, out):
            if state.step == 6:
                os.kill(os.getpid(), signal.SIGKILL)
        train_sae(cfg, {str(cache.root)!r}, {str(tmp_path / "killed")!r}, on_step=on_step,
                  progress_log=lambda line: None)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert not (tmp_path / "killed" / "sae").exists()
    assert not list((tmp_path / "killed").glob(".*tmp*"))
    resumed = train_sae(cfg, cache, tmp_path / "killed", progress_log=lambda line: None)
    assert resumed.resumed_from_step == 4
    for a, b in zip(_params(full.sae), _params(resumed.sae), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_resume_refuses_different_settings_and_single_layer_uses_same_path(tmp_path):
    cache = _cache(tmp_path, _shards())
    cfg = _small_cfg(train_tokens=32 * 4)
    train_sae(cfg, cache, tmp_path / "run", progress_log=lambda line: None)
    with pytest.raises(ValueError, match="different settings.*lr"):
        train_sae(_small_cfg(train_tokens=32 * 4, lr=1e-3), cache, tmp_path / "run")
    more = train_sae(_small_cfg(train_tokens=32 * 6), cache, tmp_path / "run",
                     progress_log=lambda line: None)  # a larger budget continues
    assert more.resumed_from_step == 4 and more.steps == 6
    single = SAEConfig(d_model=D, n_layers=L, layers=[1], n_latents=128, k=4, k_aux=8)
    res = train_sae(TrainConfig(single, train_tokens=32 * 5, batch_tokens=32),
                    cache, tmp_path / "single", progress_log=lambda line: None)
    assert res.steps == 5 and res.sae.cfg.layers == [1]
    assert res.sae.cfg.data == {"source": "synthetic"}  # the record: data the cache came from
    summary = json.loads((tmp_path / "single" / "train_summary.json").read_text())
    assert summary["steps"] == 5 and len(summary["history"]) == 5
    with pytest.raises(ValueError, match="extract the missing layers"):
        train_sae(TrainConfig(SAEConfig(d_model=D, n_layers=5, layers=[4], n_latents=128, k=4,
                                        k_aux=8), train_tokens=64, batch_tokens=32),
                  cache, tmp_path / "bad")
    with pytest.raises(ValueError, match="no basis was passed"):
        train_sae(TrainConfig(SAEConfig(d_model=D, n_layers=L, n_latents=128, k=4, k_aux=8,
                                        lens="tuned-lens"), train_tokens=64, batch_tokens=32),
                  cache, tmp_path / "bad2")


class _ShiftBasis:
    """A toy invertible basis: y = 2 x + layer."""

    name = "shift"

    def to_sae(self, x, layer):
        layer = layer if isinstance(layer, int) else layer[:, None].to(x.dtype)
        return 2 * x + layer

    def from_sae(self, y, layer):
        layer = layer if isinstance(layer, int) else layer[:, None].to(y.dtype)
        return (y - layer) / 2


def test_training_in_a_basis_records_it_and_metrics_map_back(tmp_path):
    shards = _shards(dtype=np.float32)
    cache = _cache(tmp_path, shards, dtype="float32")
    res = train_sae(_small_cfg(train_tokens=32 * 3), cache, tmp_path / "run",
                    basis=_ShiftBasis(), progress_log=lambda line: None)
    assert res.sae.cfg.lens == "shift"
    in_model_basis = reconstruction_metrics(res.sae, cache.iter_shards(), basis=_ShiftBasis(),
                                            source_layers=[0, 1, 2])
    # the same SAE on data already in its basis: errors there are twice as large
    moved = [s._replace(acts_BTLD=s.acts_BTLD * 2 + np.arange(L)[:, None]) for s in shards]
    in_sae_basis = reconstruction_metrics(res.sae, moved, source_layers=[0, 1, 2])
    for a, b in zip(in_model_basis, in_sae_basis, strict=True):
        assert a.mse == pytest.approx(b.mse / 4, rel=1e-4)
        assert a.fvu == pytest.approx(b.fvu, rel=1e-4) and a.l0 == b.l0


# Tiny shapes: a second thread only adds synchronization.
pytestmark = pytest.mark.usefixtures("one_thread")
