"""Tests for registering custom architectures with the transformers Auto classes.

Loading tests run in a fresh Python process whose import path does not include tests/, so the
registered folder must carry every file the model needs.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import subprocess
import sys
import textwrap
import types
import uuid
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")

from custom_models.layers import ResidualBlock  # noqa: E402
from custom_models.plain_config import ConfigNetConfig  # noqa: E402
from custom_models.plain_module import ConfigNet, PlainNet  # noqa: E402
from custom_models.tiny_pretrained import TinyLMConfig, TinyLMForCausalLM  # noqa: E402
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig  # noqa: E402

from hf_lifecycle import _registry_write  # noqa: E402
from hf_lifecycle.errors import RegistrationError  # noqa: E402
from hf_lifecycle.registry import register_custom_model  # noqa: E402

PLAIN_VALUES = {"vocab_size": 24, "width": 8, "depth": 3, "limit": 2.5}

# Loads a registered folder with each Auto class named on the command line, runs the stored input
# through it, and reports the comparison and the loaded config as JSON.
LOAD_SCRIPT = textwrap.dedent(
    """
    import importlib.util
    import json
    import sys

    import torch
    import transformers
    from safetensors.torch import load_file

    folder, tensors_file, result_file, *auto_classes = sys.argv[1:]
    tensors = load_file(tensors_file)
    result = {"outputs_equal": {}, "model_classes": {}}
    for name in auto_classes:
        model = getattr(transformers, name).from_pretrained(folder, trust_remote_code=True)
        with torch.no_grad():
            output = model(tensors["input"])
        output = getattr(output, "logits", output)
        result["outputs_equal"][name] = torch.equal(output, tensors["expected"])
        result["model_classes"][name] = type(model).__name__
    config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=True)
    result["config_class"] = type(config).__name__
    result["config"] = config.to_dict()
    result["test_modules_importable"] = importlib.util.find_spec("custom_models") is not None
    result["hf_lifecycle_imported"] = any(name.startswith("hf_lifecycle") for name in sys.modules)
    with open(result_file, "w") as handle:
        json.dump(result, handle, default=str)
    """
)


@pytest.fixture
def out(tmp_path: Path) -> Path:
    folder = tmp_path / "registered"
    folder.mkdir()
    return folder


def load_in_fresh_process(
    tmp_path: Path,
    folder: Path | str,
    inputs: torch.Tensor,
    expected: torch.Tensor,
    *auto_classes: str,
    env_updates: dict[str, str] | None = None,
) -> dict:
    """Load ``folder`` in a fresh Python process and return the result that LOAD_SCRIPT writes.

    ``folder`` may be a repository id when ``env_updates`` points the process at a Hub.
    """
    tensors_file = tmp_path / "tensors.safetensors"
    save_file({"input": inputs.contiguous(), "expected": expected.contiguous()}, tensors_file)
    script = tmp_path / "load_registered.py"
    script.write_text(LOAD_SCRIPT)
    result_file = tmp_path / "result.json"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["HF_HOME"] = str(tmp_path / "child_hf_home")
    env["HF_HUB_OFFLINE"] = "1"
    env.update(env_updates or {})
    command = [sys.executable, str(script), str(folder), str(tensors_file), str(result_file)]
    completed = subprocess.run(
        [*command, *auto_classes], cwd=elsewhere, env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(result_file.read_text())


def assert_empty(folder: Path) -> None:
    assert sorted(path.name for path in folder.iterdir()) == []


def safetensors_keys(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as handle:
        return set(handle.keys())


def build_plain_net() -> PlainNet:
    torch.manual_seed(0)
    return PlainNet(**PLAIN_VALUES).eval()


# Loading in a fresh process


@pytest.mark.slow
def test_pretrained_model_loads_in_fresh_process(out: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyLMForCausalLM(TinyLMConfig(vocab_size=40, hidden_size=12, num_layers=3)).eval()
    registered = register_custom_model(model, output_dir=out, description="A tiny test LM.")

    assert registered.folder == out / "hfl_tiny_lm"
    assert registered.model_class is TinyLMForCausalLM
    assert registered.config_class is TinyLMConfig
    assert registered.files == (
        "README.md",
        "config.json",
        "model.safetensors",
        "tiny_pretrained.py",
    )
    config = json.loads((registered.folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "tiny_pretrained.TinyLMConfig",
        "AutoModel": "tiny_pretrained.TinyLMForCausalLM",
        "AutoModelForCausalLM": "tiny_pretrained.TinyLMForCausalLM",
    }
    assert config["architectures"] == ["TinyLMForCausalLM"]
    assert config["model_type"] == "hfl_tiny_lm"
    # The tied output head is stored once, as save_pretrained stores it.
    weights = safetensors_keys(registered.folder / "model.safetensors")
    assert "embed.weight" in weights
    assert "lm_head.weight" not in weights

    inputs = torch.tensor([[1, 5, 9, 39], [0, 2, 4, 6]])
    expected = model(inputs).logits.detach()
    result = load_in_fresh_process(
        tmp_path, registered.folder, inputs, expected, "AutoModel", "AutoModelForCausalLM"
    )
    assert result["outputs_equal"] == {"AutoModel": True, "AutoModelForCausalLM": True}
    assert result["model_classes"]["AutoModelForCausalLM"] == "TinyLMForCausalLM"
    assert result["config_class"] == "TinyLMConfig"
    for key, value in {"vocab_size": 40, "hidden_size": 12, "num_layers": 3}.items():
        assert result["config"][key] == value
    assert result["test_modules_importable"] is False
    assert result["hf_lifecycle_imported"] is False


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model_name", "make_config"),
    [
        ("hfl_plain_cfg", lambda: PretrainedConfig(**PLAIN_VALUES)),
        ("hfl_plain_dict", lambda: dict(PLAIN_VALUES)),
    ],
    ids=["pretrained-config", "dict-config"],
)
def test_plain_module_loads_in_fresh_process(
    out: Path, tmp_path: Path, model_name: str, make_config
) -> None:
    model = build_plain_net()
    registered = register_custom_model(model, make_config(), output_dir=out, model_name=model_name)

    inputs = torch.tensor([[0, 3, 7, 23], [5, 5, 1, 2]])
    expected = model(inputs).detach()
    result = load_in_fresh_process(tmp_path, registered.folder, inputs, expected, "AutoModel")
    assert result["outputs_equal"] == {"AutoModel": True}
    assert result["model_classes"]["AutoModel"] == registered.model_class.__name__
    assert result["config_class"] == registered.config_class.__name__
    for key, value in PLAIN_VALUES.items():
        assert result["config"][key] == value
    assert result["config"]["model_type"] == model_name
    assert result["test_modules_importable"] is False
    assert result["hf_lifecycle_imported"] is False


@pytest.mark.slow
def test_plain_module_with_own_config_class_loads(out: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = ConfigNetConfig(in_features=4, out_features=6)
    model = ConfigNet(config).eval()
    registered = register_custom_model(model, config, output_dir=out)

    assert registered.model_type == "hfl_config_net"
    assert registered.config_class is ConfigNetConfig
    assert "plain_config.py" in registered.files
    assert not any(name.startswith("configuration_") for name in registered.files)
    inputs = torch.randn(3, 4)
    expected = model(inputs).detach()
    result = load_in_fresh_process(tmp_path, registered.folder, inputs, expected, "AutoModel")
    assert result["outputs_equal"] == {"AutoModel": True}
    assert result["config_class"] == "ConfigNetConfig"
    assert result["config"]["in_features"] == 4
    assert result["config"]["out_features"] == 6


# Folder contents and in-process registration


def test_plain_folder_ships_rewritten_sources(out: Path) -> None:
    registered = register_custom_model(
        build_plain_net(), dict(PLAIN_VALUES), output_dir=out, model_name="hfl_plain_dict",
        description="Residual test network.", repo_id="someone/plain-net",
    )

    folder = registered.folder
    assert registered.files == (
        "README.md",
        "activations.py",
        "config.json",
        "configuration_hfl_plain_dict.py",
        "layers.py",
        "model.safetensors",
        "modeling_hfl_plain_dict.py",
        "plain_module.py",
    )
    assert sorted(path.name for path in folder.iterdir()) == list(registered.files)
    assert sorted(path.name for path in out.iterdir()) == ["hfl_plain_dict"]
    for name in registered.files:
        if name.endswith(".py"):
            text = (folder / name).read_text()
            assert "custom_models" not in text, name
            assert "hf_lifecycle" not in text, name
    assert "from .activations import soft_clip" in (folder / "layers.py").read_text()
    assert "from .layers import ResidualBlock" in (folder / "plain_module.py").read_text()
    modeling = (folder / "modeling_hfl_plain_dict.py").read_text()
    assert "from .plain_module import PlainNet" in modeling

    weights = safetensors_keys(folder / "model.safetensors")
    assert "net.embed.weight" in weights
    assert "net.blocks.2.gain" in weights
    assert "net.head.weight" not in weights
    assert "net.blocks.0.phase" not in weights

    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_hfl_plain_dict.HflPlainDictConfig",
        "AutoModel": "modeling_hfl_plain_dict.HflPlainDictModel",
    }
    assert config["architectures"] == ["HflPlainDictModel"]
    assert config["tie_word_embeddings"] is True

    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.tags == ["hf-lifecycle", "custom_code"]
    assert "Residual test network." in card.text
    assert 'AutoModel.from_pretrained("someone/plain-net", trust_remote_code=True)' in card.text


def test_registered_classes_work_in_process(out: Path) -> None:
    plain = register_custom_model(
        build_plain_net(), dict(PLAIN_VALUES), output_dir=out, model_name="hfl_plain_dict"
    )
    config = AutoConfig.for_model("hfl_plain_dict")
    assert isinstance(config, plain.config_class)
    assert config.width == PLAIN_VALUES["width"]
    model = AutoModel.from_config(config)
    assert isinstance(model, plain.model_class)
    assert isinstance(model.net, PlainNet)
    assert model.net.head.weight is model.net.embed.weight
    assert torch.equal(model.net.blocks[0].phase, PlainNet(**PLAIN_VALUES).blocks[0].phase)

    tiny = register_custom_model(TinyLMForCausalLM(TinyLMConfig()), output_dir=out)
    assert tiny.auto_classes == ("AutoConfig", "AutoModel", "AutoModelForCausalLM")
    lm_config = AutoConfig.for_model("hfl_tiny_lm", hidden_size=8)
    assert isinstance(lm_config, TinyLMConfig)
    lm = AutoModelForCausalLM.from_config(lm_config)
    assert isinstance(lm, TinyLMForCausalLM)
    assert lm.embed.weight.shape == (32, 8)


@dataclasses.dataclass
class BlockSettings:
    width: int = 6
    limit: float = 1.5


def test_dataclass_config_becomes_config_class(out: Path) -> None:
    torch.manual_seed(0)
    block = ResidualBlock(width=6, limit=1.5)
    registered = register_custom_model(
        block, BlockSettings(), output_dir=out, model_name="hfl-block"
    )

    assert registered.folder == out / "hfl-block"
    assert registered.model_class.__name__ == "HflBlockModel"
    assert "configuration_hfl_block.py" in registered.files
    config = json.loads((registered.folder / "config.json").read_text())
    assert config["width"] == 6
    assert config["limit"] == 1.5
    assert "tie_word_embeddings" not in config
    rebuilt = AutoModel.from_config(AutoConfig.for_model("hfl-block"))
    assert isinstance(rebuilt.net, ResidualBlock)


def test_repeat_registration_replaces_folder(out: Path) -> None:
    model = build_plain_net()
    options = {"output_dir": out, "model_name": "hfl_repeat"}
    first = register_custom_model(model, dict(PLAIN_VALUES), **options)
    with torch.no_grad():
        model.blocks[0].gain.fill_(7.0)
    second = register_custom_model(model, dict(PLAIN_VALUES), **options)

    assert second.model_class is first.model_class
    assert second.config_class is first.config_class
    assert sorted(path.name for path in out.iterdir()) == ["hfl_repeat"]
    with safe_open(str(second.folder / "model.safetensors"), framework="pt") as handle:
        assert torch.equal(handle.get_tensor("net.blocks.0.gain"), torch.full((8,), 7.0))


def test_failed_write_leaves_no_trace(out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_plain_net()
    register_custom_model(model, dict(PLAIN_VALUES), output_dir=out, model_name="hfl_atomic")
    before = {path.name: path.read_bytes() for path in (out / "hfl_atomic").iterdir()}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(_registry_write, "render_model_card", fail)
    with torch.no_grad():
        model.embed.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        register_custom_model(model, dict(PLAIN_VALUES), output_dir=out, model_name="hfl_atomic")
    assert sorted(path.name for path in out.iterdir()) == ["hfl_atomic"]
    after = {path.name: path.read_bytes() for path in (out / "hfl_atomic").iterdir()}
    assert after == before

    fresh = out / "new" / "nested"
    with pytest.raises(OSError, match="disk full"):
        register_custom_model(model, dict(PLAIN_VALUES), output_dir=fresh, model_name="hfl_atomic")
    assert not (out / "new").exists()


# Rejected input: each case raises RegistrationError and writes nothing.


def make_module_without_source() -> torch.nn.Module:
    fake = types.ModuleType("hfl_fake_models")
    source = textwrap.dedent(
        """
        import torch

        class ExecNet(torch.nn.Module):
            def __init__(self, width=2):
                super().__init__()
                self.linear = torch.nn.Linear(width, width)
        """
    )
    exec(source, fake.__dict__)
    return fake.ExecNet()


class MainNet(torch.nn.Module):
    def __init__(self, width=2):
        super().__init__()
        self.linear = torch.nn.Linear(width, width)


MainNet.__module__ = "__main__"


REJECTED = [
    pytest.param(
        lambda: (None, None, {}), ["model is required", "pass model= or call set_model"],
        id="no-model",
    ),
    pytest.param(
        lambda: (build_plain_net(), [1, 2], {"model_name": "hfl_x"}),
        ["builtins.list", "PretrainedConfig, a dict, or a dataclass instance"],
        id="config-list",
    ),
    pytest.param(
        lambda: (TinyLMForCausalLM(TinyLMConfig()), {"vocab_size": 32}, {}),
        ["dict", "PretrainedConfig"],
        id="pretrained-with-dict-config",
    ),
    pytest.param(
        lambda: (make_module_without_source(), {"width": 2}, {"model_name": "hfl_exec"}),
        ["source file", "hfl_fake_models", "Move the class into a .py module"],
        id="no-source-file",
    ),
    pytest.param(
        lambda: (MainNet(), {"width": 2}, {"model_name": "hfl_main"}),
        ["__main__", "Move the class into a .py module"],
        id="class-in-main",
    ),
    pytest.param(
        lambda: (build_plain_net(), dict(PLAIN_VALUES), {"model_name": "bert"}),
        ["'bert'", "built-in transformers model type", "model_name="],
        id="builtin-model-type",
    ),
    pytest.param(
        lambda: (build_plain_net(), {**PLAIN_VALUES, "act": lambda x: x}, {"model_name": "hfl_l"}),
        ["'act'", "a lambda", "plain JSON values"],
        id="lambda-in-config",
    ),
    pytest.param(
        lambda: (build_plain_net(), {**PLAIN_VALUES, "scale": torch.ones(2)}, {"model_name": "t"}),
        ["'scale'", "torch.Tensor"],
        id="tensor-in-config",
    ),
    pytest.param(
        lambda: (build_plain_net(), {"vocab_size": 24, "depth": 3}, {"model_name": "hfl_m"}),
        ["PlainNet.__init__ requires ['width']", "Add them to the config"],
        id="constructor-argument-missing",
    ),
    pytest.param(
        lambda: (build_plain_net(), {**PLAIN_VALUES, "width": 4}, {"model_name": "hfl_shape"}),
        ["does not match the model", "blocks.0.gain: (4,) instead of (8,)"],
        id="config-does-not-match-weights",
    ),
    pytest.param(
        lambda: (TinyLMForCausalLM(TinyLMConfig()), None, {"model_name": "other"}),
        ["'other' differs from TinyLMConfig.model_type 'hfl_tiny_lm'"],
        id="pretrained-model-name-mismatch",
    ),
    pytest.param(
        lambda: (build_plain_net(), dict(PLAIN_VALUES), {"model_name": "bad name"}),
        ["Invalid model type 'bad name'"],
        id="invalid-model-name",
    ),
    pytest.param(
        lambda: (build_plain_net(), dict(PLAIN_VALUES), {}),
        ["model_name is required"],
        id="plain-without-model-name",
    ),
    pytest.param(
        lambda: ("not a model", None, {}), ["builtins.str", "torch.nn.Module"], id="not-a-module"
    ),
]


@pytest.mark.parametrize(("make_request", "fragments"), REJECTED)
def test_rejected_request_writes_nothing(out: Path, make_request, fragments: list[str]) -> None:
    model, config, options = make_request()
    with pytest.raises(RegistrationError) as caught:
        register_custom_model(model, config, output_dir=out, **options)
    for fragment in fragments:
        assert fragment in str(caught.value)
    assert_empty(out)


def test_model_type_taken_by_other_class(out: Path) -> None:
    torch.manual_seed(0)
    register_custom_model(
        ResidualBlock(4, 1.0), {"width": 4, "limit": 1.0}, output_dir=out, model_name="hfl_taken"
    )
    before = sorted(path.name for path in (out / "hfl_taken").iterdir())
    with pytest.raises(RegistrationError, match="already registered in this process"):
        register_custom_model(
            build_plain_net(), dict(PLAIN_VALUES), output_dir=out, model_name="hfl_taken"
        )
    assert sorted(path.name for path in (out / "hfl_taken").iterdir()) == before


def test_unrelated_folder_at_target_is_kept(out: Path) -> None:
    target = out / "hfl_plain_dict"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(RegistrationError, match="does not contain a registered model"):
        register_custom_model(
            build_plain_net(), dict(PLAIN_VALUES), output_dir=out, model_name="hfl_plain_dict"
        )
    assert sorted(path.name for path in out.iterdir()) == ["hfl_plain_dict"]
    assert sorted(path.name for path in target.iterdir()) == ["notes.txt"]


def test_missing_transformers_names_the_extra(out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(RegistrationError, match=r'pip install "hf-lifecycle\[transformers\]"'):
        register_custom_model(build_plain_net(), dict(PLAIN_VALUES), output_dir=out)
    assert_empty(out)


UNPORTABLE_SOURCES = {
    "sys-path": (
        "import sys\n\n\ndef add_models_folder():\n    sys.path.append('models')\n",
        "changes the import path",
    ),
    "absolute-path": (
        "VOCAB = '/home/someone/vocab.txt'\n",
        "absolute path '/home/someone/vocab.txt'",
    ),
    "module-object-import": (
        "from {package} import helpers\n",
        "imports the module {package}.helpers as an object",
    ),
    "plain-import": (
        "import {package}.helpers\n",
        "imports the module object '{package}.helpers'",
    ),
}


@pytest.mark.parametrize("case", sorted(UNPORTABLE_SOURCES))
def test_unportable_source_is_rejected(
    out: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    package = f"hfl_user_{uuid.uuid4().hex[:8]}"
    snippet, message = (text.format(package=package) for text in UNPORTABLE_SOURCES[case])
    root = tmp_path / "user_code"
    (root / package).mkdir(parents=True)
    (root / package / "__init__.py").write_text("")
    (root / package / "helpers.py").write_text("WIDTH = 3\n")
    model_source = snippet + textwrap.dedent(
        """
        import torch


        class UserNet(torch.nn.Module):
            def __init__(self, width=3):
                super().__init__()
                self.linear = torch.nn.Linear(width, width)
        """
    )
    (root / package / "model.py").write_text(model_source)
    monkeypatch.syspath_prepend(str(root))
    module = importlib.import_module(f"{package}.model")

    with pytest.raises(RegistrationError) as caught:
        register_custom_model(module.UserNet(), {"width": 3}, output_dir=out, model_name="hfl_u")
    assert message in str(caught.value)
    assert_empty(out)

