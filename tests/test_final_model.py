"""save_final_model: the folder layout, tied weights, and loading with transformers."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import safetensors
import torch

from hf_lifecycle import CheckpointSaveError, ConfigurationError, HFManager, load_model_weights
from hf_lifecycle.final_model import PUBLISHED_RECORD

FORMATS = ["pt", "safetensors"]
WEIGHT_FILES = {"pt": "pytorch_model.bin", "safetensors": "model.safetensors"}


class TinyLM(torch.nn.Module):
    """An embedding and an LM head that share one weight matrix."""

    def __init__(self, vocab: int = 11, width: int = 4) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.body = torch.nn.Linear(width, width)
        self.lm_head = torch.nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.embed.weight


def tiny_lm(seed: int) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM()


def new_manager(tmp_path: Path) -> HFManager:
    return HFManager(local_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ckpt")


def assert_holds_model(path: str | Path, seed: int) -> None:
    """Check that the weights saved at ``path`` are those of ``tiny_lm(seed)``."""
    restored = tiny_lm(seed + 100)
    load_model_weights(restored, path)
    assert_same_weights(tiny_lm(seed), restored)


def leftovers(folder: Path) -> list[str]:
    """Hidden files in ``folder`` other than the record of published model files."""
    names = os.listdir(folder)
    return [name for name in names if name.startswith(".") and name != PUBLISHED_RECORD]


def assert_same_weights(expected: torch.nn.Module, actual: torch.nn.Module) -> None:
    expected_state, actual_state = expected.state_dict(), actual.state_dict()
    assert sorted(actual_state) == sorted(expected_state)
    for key, value in expected_state.items():
        assert torch.equal(actual_state[key], value), key


@pytest.mark.parametrize("format", FORMATS)
def test_final_model_in_local_dir(tmp_path, format):
    manager = new_manager(tmp_path)

    folder = manager.save_final_model(tiny_lm(0), format=format, config={"vocab": 11})

    assert folder == str(tmp_path / "out" / "final_model")
    assert sorted(os.listdir(folder)) == sorted(["config.json", WEIGHT_FILES[format]])
    assert os.listdir(manager.checkpoint_dir) == []
    assert json.loads(Path(folder, "config.json").read_text()) == {"vocab": 11}


@pytest.mark.parametrize("format", FORMATS)
def test_final_model_tied_round_trip(tmp_path, format):
    original = tiny_lm(0)
    folder = new_manager(tmp_path).save_final_model(original, name="lm", format=format)
    restored = tiny_lm(1)
    assert not torch.equal(restored.embed.weight, original.embed.weight)

    load_model_weights(restored, folder)

    assert restored.lm_head.weight is restored.embed.weight
    assert_same_weights(original, restored)


def test_final_model_tied_stored_once(tmp_path):
    folder = new_manager(tmp_path).save_final_model(tiny_lm(0), format="safetensors")

    with safetensors.safe_open(os.path.join(folder, "model.safetensors"), framework="pt") as handle:
        keys = sorted(handle.keys())
        assert handle.metadata()["format"] == "pt"
    assert keys == ["body.bias", "body.weight", "embed.weight"]


@pytest.mark.parametrize(("first", "second"), [("pt", "safetensors"), ("safetensors", "pt")])
def test_final_model_replace_drops_old_files(tmp_path, first, second):
    manager = new_manager(tmp_path)
    manager.save_final_model(tiny_lm(0), format=first)

    folder = manager.save_final_model(tiny_lm(1), format=second)

    assert os.listdir(folder) == [WEIGHT_FILES[second]]
    assert leftovers(tmp_path / "out") == []
    assert_holds_model(folder, 1)


def test_final_model_needs_model(tmp_path):
    with pytest.raises(ConfigurationError) as caught:
        new_manager(tmp_path).save_final_model()
    assert "model" in str(caught.value)


def test_final_model_uses_set_model(tmp_path):
    manager = new_manager(tmp_path)
    original = tiny_lm(0)
    manager.set_model(original)

    folder = manager.save_final_model(format="safetensors")

    restored = tiny_lm(1)
    load_model_weights(restored, folder)
    assert_same_weights(original, restored)


@pytest.mark.parametrize("format", FORMATS)
def test_final_model_gpt2_from_pretrained(tmp_path, format):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()

    manager = new_manager(tmp_path)
    folder = manager.save_final_model(model, name="gpt2", format=format, config=config)

    tokens = torch.arange(8).unsqueeze(0)
    for path in (folder, manager.local_dir):
        loaded = transformers.GPT2LMHeadModel.from_pretrained(path).eval()
        assert_same_weights(model, loaded)
        assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
        with torch.no_grad():
            assert torch.equal(loaded(tokens).logits, model(tokens).logits)


@pytest.mark.parametrize(("first", "second"), [("pt", "safetensors"), ("safetensors", "pt")])
def test_local_dir_gets_latest_final_model(tmp_path, first, second):
    manager = new_manager(tmp_path)
    manager.save_final_model(tiny_lm(0), name="early", format=first, config={"vocab": 11})

    manager.save_final_model(tiny_lm(1), name="late", format=second)

    root = tmp_path / "out"
    assert (root / WEIGHT_FILES[second]).is_file()
    assert not (root / WEIGHT_FILES[first]).exists()
    assert not (root / "config.json").exists()  # The later save has no config.
    assert leftovers(root) == []
    assert_holds_model(root, 1)
    earlier = tiny_lm(2)
    load_model_weights(earlier, root / "early")
    assert_same_weights(tiny_lm(0), earlier)


@pytest.mark.parametrize("config", [None, {"vocab": 11}])
def test_users_own_config_left_alone(tmp_path, config, caplog):
    root = tmp_path / "out"
    root.mkdir()
    (root / "config.json").write_text('{"mine": true}')
    manager = new_manager(tmp_path)

    folder = manager.save_final_model(tiny_lm(0), format="safetensors", config=config)

    assert (root / "config.json").read_text() == '{"mine": true}'
    assert not (root / "model.safetensors").exists()
    assert "was not written by save_final_model" in caplog.text
    assert_holds_model(folder, 0)


def test_symlinked_weights_left_alone(tmp_path, caplog):
    root = tmp_path / "out"
    root.mkdir()
    elsewhere = tmp_path / "elsewhere.safetensors"
    elsewhere.write_bytes(b"not ours")
    (root / "model.safetensors").symlink_to(elsewhere)
    manager = new_manager(tmp_path)

    manager.save_final_model(tiny_lm(0), format="pt")

    assert (root / "model.safetensors").is_symlink()
    assert elsewhere.read_bytes() == b"not ours"
    assert not (root / "pytorch_model.bin").exists()
    assert "model.safetensors" in caplog.text


def fail_linking(monkeypatch, name: str) -> None:
    """Make linking (and the copy that replaces it) fail for files called ``name``."""
    real_link, real_copy = os.link, shutil.copyfile

    def failing(real):
        def call(source, target):
            if Path(source).name != name:
                return real(source, target)
            raise OSError(28, "No space left on device")

        return call

    monkeypatch.setattr(os, "link", failing(real_link))
    monkeypatch.setattr(shutil, "copyfile", failing(real_copy))


def test_failed_link_leaves_no_mixed_files(tmp_path, monkeypatch):
    root = tmp_path / "out"
    manager = new_manager(tmp_path)
    manager.save_final_model(tiny_lm(0), format="safetensors", config={"version": 1})
    fail_linking(monkeypatch, "model.safetensors")

    with pytest.raises(CheckpointSaveError) as caught:
        manager.save_final_model(tiny_lm(1), format="safetensors", config={"version": 2})

    assert str(root / "final_model") in str(caught.value)
    assert not (root / "config.json").exists()
    assert not (root / "model.safetensors").exists()
    assert_holds_model(root / "final_model", 1)
    monkeypatch.undo()
    manager.save_final_model(tiny_lm(1), format="safetensors", config={"version": 2})
    assert json.loads((root / "config.json").read_text()) == {"version": 2}


def test_interrupted_format_switch_recovers(tmp_path, monkeypatch):
    # safetensors, then a pt save whose linking fails: the next save must still know that
    # model.safetensors in local_dir is the library's, and remove it.
    root = tmp_path / "out"
    manager = new_manager(tmp_path)
    manager.save_final_model(tiny_lm(0), format="safetensors", config={"version": 1})
    fail_linking(monkeypatch, "config.json")
    with pytest.raises(CheckpointSaveError):
        manager.save_final_model(tiny_lm(1), format="pt", config={"version": 2})
    monkeypatch.undo()

    manager.save_final_model(tiny_lm(1), format="pt", config={"version": 2})

    assert not (root / "model.safetensors").exists()
    assert (root / "pytorch_model.bin").is_file()
    assert_holds_model(root, 1)


def test_unreadable_record_ignored(tmp_path, caplog):
    root = tmp_path / "out"
    root.mkdir()
    (root / PUBLISHED_RECORD).write_text('{"files": {"config.json": [[Infinity, 1]]}}')
    manager = new_manager(tmp_path)

    manager.save_final_model(tiny_lm(0), format="safetensors")

    assert (root / "model.safetensors").is_file()
    assert "Ignoring unreadable" in caplog.text
