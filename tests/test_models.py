"""Model loading: the embedded default, local directories, and fast offline failure for hub ids."""

from __future__ import annotations

import re
import time

import pytest
import torch

from mlsae.models import ModelLoadError, load_model, resolve_model_source
from mlsae.paths import EMBEDDED_MODEL_DIR


def test_embedded_model_loads_with_plain_transformers():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(EMBEDDED_MODEL_DIR)
    tok = AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR)
    assert model.config.model_type == "gpt_neox"
    assert model.config.num_hidden_layers >= 6 and model.config.hidden_size >= 256
    assert tok.eos_token == "<|endoftext|>"


def test_load_model_defaults_to_embedded_and_predicts_text():
    loaded = load_model(None, device="cpu")
    assert loaded.name == "embedded"
    ids = loaded.tokenizer("And God said, Let there be light: and there was light.",
                           return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        loss = loaded.model(input_ids=ids, labels=ids).loss.item()
    # A trained model, not random init (random: ln(8192) ~ 9.0 nats).
    assert loss < 5.0


def test_unknown_local_path_names_the_fix(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_source(str(tmp_path / "nope" / "model"))


def test_directory_without_config_names_the_fix(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        resolve_model_source(tmp_path)


def test_hub_id_offline_fails_fast_with_instructions(monkeypatch):
    # Without HF_HUB_OFFLINE as well: the reachability probe must answer within seconds.
    for offline in ("1", ""):
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
        start = time.perf_counter()
        with pytest.raises(ModelLoadError, match="--model DIR"):
            load_model("EleutherAI/pythia-70m-deduped")
        assert time.perf_counter() - start < 10


# --------------------------------------------------------------------------- weight files

def _model_copy(tmp_path, name="model"):
    """A copy of the embedded model (weights copied, the rest linked)."""
    import shutil

    target = tmp_path / name
    target.mkdir()
    for path in EMBEDDED_MODEL_DIR.iterdir():
        if path.name == "model.safetensors":
            shutil.copyfile(path, target / path.name)
        else:
            (target / path.name).symlink_to(path)
    return target


def test_check_model_files_passes_the_embedded_model_quickly():
    from mlsae.models import check_model_files

    start = time.perf_counter()
    check_model_files(None)
    check_model_files("embedded")
    check_model_files(EMBEDDED_MODEL_DIR)
    assert time.perf_counter() - start < 0.5


def test_truncated_safetensors_names_the_file_and_the_fix(tmp_path):
    from mlsae.models import check_model_files

    copy = _model_copy(tmp_path)
    weights = copy / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "rb+") as f:
        f.truncate(size // 2)
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: truncated: the header says "
                       r"\d+ bytes of tensor data, the file has \d+.*save_pretrained") as err:
        check_model_files(copy)
    assert time.perf_counter() - start < 0.5
    assert str(weights.resolve()) in str(err.value)
    # load_model checks before transformers gets to it (it would say only "incomplete metadata")
    with pytest.raises(ModelLoadError, match="model.safetensors: truncated"):
        load_model(copy, device="cpu")
    with open(weights, "rb+") as f:  # shorter than the header itself
        f.truncate(100)
    with pytest.raises(ModelLoadError, match="truncated: the header says it is"):
        check_model_files(copy)


def test_corrupt_header_and_trailing_bytes(tmp_path):
    from mlsae.models import check_model_files

    copy = _model_copy(tmp_path)
    weights = copy / "model.safetensors"
    with open(weights, "rb+") as f:
        f.seek(8)
        f.write(b"#garbage#")
    with pytest.raises(ModelLoadError, match="model.safetensors: corrupt header: it does not "
                                             "parse as JSON"):
        check_model_files(copy)
    with open(weights, "rb+") as f:
        f.seek(0)
        f.write((2**40).to_bytes(8, "little"))
    with pytest.raises(ModelLoadError, match="corrupt header: its length field says"):
        check_model_files(copy)

    copy2 = _model_copy(tmp_path, "model2")
    with open(copy2 / "model.safetensors", "ab") as f:
        f.write(b"\0" * 10)
    with pytest.raises(ModelLoadError, match="has trailing bytes"):
        check_model_files(copy2)


def test_missing_weights_and_missing_shard(tmp_path):
    import json

    from mlsae.models import check_model_files

    copy = _model_copy(tmp_path)
    (copy / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no weights \(model\.safetensors"):
        check_model_files(copy)
    # sharded: the index names a shard that is not there
    (copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a.weight": "model-00001-of-00002.safetensors",
        "b.weight": "model-00002-of-00002.safetensors"}}))
    (copy / "model-00001-of-00002.safetensors").symlink_to(
        EMBEDDED_MODEL_DIR / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"model-00002-of-00002\.safetensors: missing "
                                             r"\(1 of 2 shards"):
        check_model_files(copy)
    (copy / "model-00002-of-00002.safetensors").write_bytes(b"\0" * 4)
    with pytest.raises(ModelLoadError, match="model-00002-of-00002.safetensors: truncated"):
        check_model_files(copy)
    # a damaged torch .bin
    bin_dir = _model_copy(tmp_path, "bin")
    (bin_dir / "model.safetensors").unlink()
    (bin_dir / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ModelLoadError, match="pytorch_model.bin: truncated or not a torch"):
        check_model_files(bin_dir)


def _suggested_commands(message: str) -> list[list[str]]:
    import re
    import shlex

    return [shlex.split(cmd) for cmd in re.findall(r"`(hf [^`]*)`", message)]


def test_offline_messages_suggest_a_command_the_installed_hf_cli_accepts(monkeypatch, tmp_path):
    """The suggested `hf download ...` parses against the installed CLI: click validates
    every option before --help runs, so an unknown flag exits 2."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from mlsae.data import DataConfig, DataError, iter_documents

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    messages = []
    with pytest.raises(ModelLoadError) as err:
        resolve_model_source("someone/some-model")
    messages.append(str(err.value))
    with pytest.raises(DataError) as err:
        next(iter_documents(DataConfig(source="someone/corpus")))
    messages.append(str(err.value))
    hf = Path(sys.executable).parent / "hf"
    hf = str(hf) if hf.exists() else shutil.which("hf")
    assert hf, "huggingface_hub's `hf` CLI is not installed beside this python"
    help_text = subprocess.run([hf, "download", "--help"], capture_output=True, text=True,
                               check=True).stdout
    for message in messages:
        commands = _suggested_commands(message)
        assert len(commands) == 1, message
        argv = commands[0]
        assert argv[:2] == ["hf", "download"] and "huggingface-cli" not in message
        done = subprocess.run([hf, *argv[1:], "--help"], capture_output=True, text=True)
        assert done.returncode == 0, (argv, done.stdout + done.stderr)
        if "--repo-type" in argv:
            value = argv[argv.index("--repo-type") + 1]
            assert re.search(rf"--repo-type \[[a-z|]*\b{value}\b", help_text), help_text
