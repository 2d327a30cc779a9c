"""Streaming training: one pass of the model feeds several SAEs, exact resume without replay,
shuffling off (stream == cache), stop at a step boundary, progress on resume."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mlsae.data import DataConfig
from mlsae.extract import ActivationStream, ExtractConfig, extract_to_cache
from mlsae.lens import load_basis
from mlsae.models import load_model
from mlsae.sae import SAEConfig, TrainConfig, TrainingInterrupted, train_many, train_sae

SEQ = 32
WINDOW_SEQ = 4  # shuffle_tokens // SEQ


def _quiet(line):
    pass


@pytest.fixture(scope="module")
def loaded():
    return load_model("embedded", device="cpu")


def _extract(**kw) -> ExtractConfig:
    base = dict(data=DataConfig(split="train", seq_len=SEQ), max_sequences=24, batch_size=4,
                shard_sequences=8, device="cpu")
    return ExtractConfig(**{**base, **kw})


def _stream(loaded, log=None, **kw) -> ActivationStream:
    return ActivationStream(_extract(**kw), loaded, log=log or _quiet)


def _cfg(layers=None, k=8, seed=0, **kw) -> TrainConfig:
    sae = SAEConfig(d_model=256, n_layers=6, layers=layers, n_latents=256, k=k, k_aux=16,
                    dead_tokens=150)
    base = dict(train_tokens=64 * 8, batch_tokens=64, lr=3e-3, shuffle_tokens=SEQ * WINDOW_SEQ,
                checkpoint_every=3, seed=seed, geometric_median_iters=10)
    return TrainConfig(sae, **{**base, **kw})


def _equal(a, b):
    assert a.steps == b.steps
    for p, q in zip(a.sae.parameters(), b.sae.parameters(), strict=True):
        assert torch.equal(p, q)
    assert a.history == b.history


class Killed(Exception):
    pass


def test_shuffle_off_stream_equals_cache(loaded, tmp_path):
    cache = extract_to_cache(_extract(), tmp_path / "cache", loaded=loaded, log=_quiet)
    cfg = _cfg(shuffle=False)
    from_cache = train_sae(cfg, cache, tmp_path / "c", progress_log=_quiet)
    from_stream = train_sae(cfg, _stream(loaded), tmp_path / "s", progress_log=_quiet)
    # whole cache shards as a plain iterable: other window boundaries, same rows in order
    from_shards = train_sae(cfg, list(cache.iter_shards()), tmp_path / "i",
                            source_layers=cache.layers, progress_log=_quiet)
    _equal(from_cache, from_stream)
    _equal(from_cache, from_shards)
    shuffled = train_sae(_cfg(), _stream(loaded), tmp_path / "on", progress_log=_quiet)
    assert not torch.equal(shuffled.sae.W_enc_MD, from_stream.sae.W_enc_MD)


def test_one_pass_feeds_every_sae_as_if_trained_alone(loaded, tmp_path):
    lens = load_basis("embedded", loaded)
    cfgs = [_cfg(seed=0), _cfg(layers=[3], seed=1), _cfg(k=4, seed=2),
            _cfg(layers=[1, 4], seed=3)]
    bases = [None, None, None, lens]
    stream = _stream(loaded)
    together = train_many(cfgs, stream, [tmp_path / f"m{i}" for i in range(4)], bases,
                          progress_log=_quiet)
    one_pass = stream.sequences_run
    assert one_pass == 20  # 8 steps x 64 tokens: 5 windows of 4 sequences (EOTs are masked)
    assert together[3].sae.cfg.lens == "embedded" and together[1].sae.cfg.layers == [3]
    for i, (cfg, basis) in enumerate(zip(cfgs, bases, strict=True)):
        alone_stream = _stream(loaded)
        alone = train_sae(cfg, alone_stream, tmp_path / f"a{i}", basis, progress_log=_quiet)
        assert alone_stream.sequences_run == one_pass
        _equal(together[i], alone)
    with pytest.raises(ValueError, match="batch_tokens"):
        train_many([_cfg(), _cfg(batch_tokens=32)], _stream(loaded), [tmp_path / "x", tmp_path / "y"])


def test_cache_pass_needs_one_sequence_order(loaded, tmp_path):
    cache = extract_to_cache(_extract(max_sequences=8), tmp_path / "cache", loaded=loaded,
                             log=_quiet)
    small = dict(train_tokens=64 * 2)
    with pytest.raises(ValueError, match="data_seed"):
        train_many([_cfg(seed=0, **small), _cfg(seed=1, **small)], cache,
                   [tmp_path / "x", tmp_path / "y"])
    cfgs = [_cfg(seed=0, data_seed=7, **small), _cfg(layers=[2], seed=1, data_seed=7, **small)]
    together = train_many(cfgs, cache, [tmp_path / "a", tmp_path / "b"], progress_log=_quiet)
    _equal(together[1], train_sae(cfgs[1], cache, tmp_path / "c", progress_log=_quiet))


def test_streaming_resume_runs_no_model_before_the_checkpoint(loaded, tmp_path):
    cfg = _cfg()
    full_stream = _stream(loaded)
    full = train_sae(cfg, full_stream, tmp_path / "full", progress_log=_quiet)

    def kill(state, _out):
        if state.step == 7:
            raise Killed

    with pytest.raises(Killed):
        train_sae(cfg, _stream(loaded), tmp_path / "run", on_step=kill, progress_log=_quiet)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 6
    window = ckpt["position"][1]
    assert window >= 2
    again = _stream(loaded)
    resumed = train_sae(cfg, again, tmp_path / "run", progress_log=_quiet)
    assert resumed.resumed_from_step == 6
    _equal(full, resumed)
    # the model ran only from the checkpoint's window on
    assert again.sequences_run == full_stream.sequences_run - window * WINDOW_SEQ


def test_uneven_checkpoints_and_should_stop_end_identical(loaded, tmp_path):
    cfgs = [_cfg(seed=0, checkpoint_every=1), _cfg(layers=[2], k=4, seed=1, checkpoint_every=1)]

    def dirs(name):
        return [tmp_path / f"{name}{i}" for i in range(2)]

    full = train_many(cfgs, _stream(loaded), dirs("full"), progress_log=_quiet)

    def kill(i, state, _out):
        if i == 0 and state.step == 5:  # SAE 0 wrote step 5, SAE 1 is still at 4
            raise Killed

    with pytest.raises(Killed):
        train_many(cfgs, _stream(loaded), dirs("kill"), on_step=kill, progress_log=_quiet)
    resumed = train_many(cfgs, _stream(loaded), dirs("kill"), progress_log=_quiet)
    assert [r.resumed_from_step for r in resumed] == [5, 4]
    for a, b in zip(full, resumed, strict=True):
        _equal(a, b)

    calls = []

    def stop():
        calls.append(1)
        return len(calls) == 3

    stop_cfgs = [dataclasses.replace(c, checkpoint_every=0) for c in cfgs]
    with pytest.raises(TrainingInterrupted, match="rerun the same command"):
        train_many(stop_cfgs, _stream(loaded), dirs("stop"), progress_log=_quiet,
                   should_stop=stop)
    for d in dirs("stop"):
        assert torch.load(d / "checkpoint.pt", weights_only=True)["step"] == 3
    with pytest.raises(TrainingInterrupted):  # train_sae stops the same way
        train_sae(stop_cfgs[0], _stream(loaded), tmp_path / "single", progress_log=_quiet,
                  should_stop=lambda: True)
    assert torch.load(tmp_path / "single" / "checkpoint.pt", weights_only=True)["step"] == 1
    finished = train_many(stop_cfgs, _stream(loaded), dirs("stop"), progress_log=_quiet)
    for a, b in zip(full, finished, strict=True):
        _equal(a, b)


def test_progress_total_is_the_whole_budget_on_resume(loaded, tmp_path):
    cfg = _cfg(log_every_s=0.0, checkpoint_every=4)

    def kill(state, _out):
        if state.step == 5:
            raise Killed

    with pytest.raises(Killed):
        train_sae(cfg, _stream(loaded), tmp_path / "run", on_step=kill, progress_log=_quiet)
    lines = []
    train_sae(cfg, _stream(loaded, log=lines.append), tmp_path / "run",
              progress_log=lines.append)
    assert "continued from the checkpoint at step 4 of 8" in lines[0]
    progress = lines[1:]
    assert len(progress) == 5  # steps 5..8 and the final line: no separate extract lines
    assert progress[0].startswith("train sae (6 layers): 320/512")
    assert progress[-1].startswith("train sae (6 layers): 512/512") and "(done)" in progress[-1]
    assert not any("extract" in line for line in lines)


# Tiny shapes: a second thread only adds synchronization.
pytestmark = pytest.mark.usefixtures("one_thread")


def test_checkpoints_follow_wall_time_not_steps(loaded, tmp_path, monkeypatch):
    """checkpoint_every=0 with checkpoint_seconds: a checkpoint once that much (fake) time
    passed since the last one, none before; plus the one at the end."""
    import mlsae.sae.train as train_module

    clock = [0.0]
    monkeypatch.setattr(train_module.time, "perf_counter", lambda: clock[0])
    saved: list[int] = []
    real_save = train_module._Member.save

    def counting_save(self):
        saved.append(self.state.step)
        real_save(self)

    monkeypatch.setattr(train_module._Member, "save", counting_save)

    def tick(state, out):
        clock[0] += 25.0  # each step "takes" 25 s

    cfg = _cfg(checkpoint_every=0, checkpoint_seconds=60.0)
    train_sae(cfg, _stream(loaded), tmp_path / "run", on_step=tick, progress_log=_quiet)
    # a step's check sees the time of the steps before it: saves after steps 4 and 7
    # (75 s, 150 s since the last save), then the end (8)
    assert saved[:-1] == [4, 7] and saved[-1] == 8
