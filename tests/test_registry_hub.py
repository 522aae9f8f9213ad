"""HFManager.register_custom_model against LocalHub, loaded back by repository id.

Loading runs in a fresh Python process that gets only the repository id, the server's endpoint
and a token, with an empty HF_HOME and an import path without tests/, so the repository must
carry every file the model needs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from custom_models.tiny_pretrained import TinyLMConfig, TinyLMForCausalLM  # noqa: E402
from huggingface_hub import HfApi, constants, hf_hub_download  # noqa: E402
from huggingface_hub.errors import RepositoryNotFoundError  # noqa: E402
from test_registry import (  # noqa: E402
    PLAIN_VALUES,
    build_plain_net,
    load_in_fresh_process,
    make_module_without_source,
)
from transformers import PretrainedConfig  # noqa: E402

from hf_lifecycle import (  # noqa: E402
    ConfigurationError,
    HFManager,
    HubAuthenticationError,
    PushError,
    RegistrationError,
    RepoIdRequiredError,
)

TOKEN = os.environ["HF_TOKEN"]
TINY_VALUES = {"vocab_size": 40, "hidden_size": 12, "num_layers": 3}


def make_manager(folder: Path, repo_id: str | None, **options) -> HFManager:
    options.setdefault("push_retry_wait", 0.05)
    return HFManager(
        repo_id, local_dir=folder / "outputs", checkpoint_dir=folder / "checkpoints", **options
    )


def owner_api() -> HfApi:
    return HfApi(endpoint=constants.ENDPOINT, token=TOKEN)


def hub_env(hub) -> dict[str, str]:
    """Environment of a loading process that reaches the Hub only through ``hub``."""
    return {
        "HF_ENDPOINT": hub.endpoint,
        "HF_TOKEN": TOKEN,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_OFFLINE": "0",
    }


def build_tiny_lm() -> TinyLMForCausalLM:
    torch.manual_seed(0)
    return TinyLMForCausalLM(TinyLMConfig(**TINY_VALUES)).eval()


def files_under(folder: Path) -> list[str]:
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*"))


# Push, then load by repository id in a fresh process


@pytest.mark.slow
def test_pretrained_model_loads_from_hub(hub, repo_id, tmp_path):
    model = build_tiny_lm()
    manager = make_manager(tmp_path, repo_id)
    url = manager.register_custom_model(model, push_to_hub=True, description="Tiny test LM.")

    assert url == f"{hub.endpoint}/{repo_id}"
    inputs = torch.tensor([[1, 5, 9, 39], [0, 2, 4, 6]])
    expected = model(inputs).logits.detach()
    result = load_in_fresh_process(
        tmp_path, repo_id, inputs, expected, "AutoModel", "AutoModelForCausalLM",
        env_updates=hub_env(hub),
    )
    assert result["outputs_equal"] == {"AutoModel": True, "AutoModelForCausalLM": True}
    assert result["model_classes"]["AutoModelForCausalLM"] == "TinyLMForCausalLM"
    assert result["config_class"] == "TinyLMConfig"
    for key, value in TINY_VALUES.items():
        assert result["config"][key] == value
    assert result["config"]["model_type"] == "hfl_tiny_lm"
    assert result["test_modules_importable"] is False
    assert result["hf_lifecycle_imported"] is False


@pytest.mark.slow
def test_plain_module_loads_from_hub(hub, repo_id, tmp_path):
    model = build_plain_net()
    manager = make_manager(tmp_path, repo_id)
    url = manager.register_custom_model(
        model, PretrainedConfig(**PLAIN_VALUES), model_name="hfl_hub_plain", push_to_hub=True
    )

    assert url == f"{hub.endpoint}/{repo_id}"
    files = set(owner_api().list_repo_files(repo_id))
    for name in ("layers.py", "activations.py", "plain_module.py", "modeling_hfl_hub_plain.py"):
        assert name in files
    inputs = torch.tensor([[0, 3, 7, 23], [5, 5, 1, 2]])
    expected = model(inputs).detach()
    result = load_in_fresh_process(
        tmp_path, repo_id, inputs, expected, "AutoModel", env_updates=hub_env(hub)
    )
    assert result["outputs_equal"] == {"AutoModel": True}
    assert result["model_classes"]["AutoModel"] == "HflHubPlainModel"
    assert result["config_class"] == "HflHubPlainConfig"
    for key, value in PLAIN_VALUES.items():
        assert result["config"][key] == value
    assert result["test_modules_importable"] is False
    assert result["hf_lifecycle_imported"] is False


@pytest.mark.slow
def test_local_folder_loads_without_push(hub, tmp_path):
    model = build_plain_net()
    manager = make_manager(tmp_path, None)
    url = manager.register_custom_model(model, dict(PLAIN_VALUES), model_name="hfl_hub_local")

    assert url is None
    assert hub.stats["any"] == 0
    folder = manager.local_dir / "custom_models" / "hfl_hub_local"
    inputs = torch.tensor([[2, 4, 6, 8]])
    expected = model(inputs).detach()
    result = load_in_fresh_process(tmp_path, folder, inputs, expected, "AutoModel")
    assert result["outputs_equal"] == {"AutoModel": True}
    for key, value in PLAIN_VALUES.items():
        assert result["config"][key] == value
    assert result["test_modules_importable"] is False


@pytest.mark.slow
def test_private_repo_hidden(hub, repo_id, tmp_path, intruder_token):
    model = build_tiny_lm()
    manager = make_manager(tmp_path, repo_id, private=True)
    manager.register_custom_model(model, push_to_hub=True)

    assert owner_api().repo_info(repo_id).private is True
    intruder = HfApi(endpoint=constants.ENDPOINT, token=intruder_token)
    with pytest.raises(RepositoryNotFoundError):
        intruder.repo_info(repo_id)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(repo_id, "config.json", token=intruder_token, cache_dir=tmp_path / "i")
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=constants.ENDPOINT, token=False).repo_info(repo_id)

    inputs = torch.tensor([[3, 1, 4, 1]])
    expected = model(inputs).logits.detach()
    result = load_in_fresh_process(
        tmp_path, repo_id, inputs, expected, "AutoModel", env_updates=hub_env(hub)
    )
    assert result["outputs_equal"] == {"AutoModel": True}
    assert result["config"]["hidden_size"] == TINY_VALUES["hidden_size"]


# Commit


def test_commit_message_is_title(hub, repo_id, tmp_path):
    manager = make_manager(tmp_path, repo_id)
    manager.register_custom_model(
        build_tiny_lm(), push_to_hub=True, commit_message="Add the tiny LM architecture"
    )

    commits = owner_api().list_repo_commits(repo_id)
    assert commits[0].title == "Add the tiny LM architecture"
    assert hub.stats["commit"] == 1


@pytest.mark.parametrize("message", ["", "   ", None], ids=["empty", "blank", "none"])
def test_invalid_commit_message_raises(hub, repo_id, tmp_path, message):
    manager = make_manager(tmp_path, repo_id)
    before = files_under(manager.local_dir)
    with pytest.raises(ConfigurationError, match="commit_message"):
        manager.register_custom_model(build_tiny_lm(), push_to_hub=True, commit_message=message)

    assert files_under(manager.local_dir) == before
    assert hub.stats["any"] == 0


def test_failed_commit_raises_push_error(hub, repo_id, tmp_path):
    manager = make_manager(tmp_path, repo_id, push_retries=1)
    hub.faults.fail("commit", status=500, times=None)
    with pytest.raises(PushError, match=repo_id) as caught:
        manager.register_custom_model(build_tiny_lm(), push_to_hub=True)

    assert caught.value.repo_id == repo_id
    assert hub.stats["commit"] == 2
    # The folder stays, so a second call only has to upload it.
    assert (manager.local_dir / "custom_models" / "hfl_tiny_lm" / "config.json").is_file()


def test_missing_token_raises_first(hub, repo_id, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    manager = make_manager(tmp_path, repo_id)
    before = files_under(manager.local_dir)
    with pytest.raises(HubAuthenticationError, match="token"):
        manager.register_custom_model(build_tiny_lm(), push_to_hub=True)

    assert files_under(manager.local_dir) == before
    assert hub.stats["any"] == 0


def test_repo_id_argument_overrides_manager(hub, repo_id, tmp_path):
    other = f"{repo_id}-other"
    manager = make_manager(tmp_path, repo_id)
    url = manager.register_custom_model(build_tiny_lm(), repo_id=other, push_to_hub=True)

    assert url == f"{hub.endpoint}/{other}"
    assert owner_api().repo_exists(other) is True
    assert owner_api().repo_exists(repo_id) is False
    card = Path(hf_hub_download(other, "README.md", token=TOKEN, cache_dir=tmp_path / "cache"))
    assert f'AutoModelForCausalLM.from_pretrained("{other}"' in card.read_text()


# Rejected requests write nothing and push nothing


REJECTED = [
    pytest.param(lambda: {}, ["model is required", "set_model"], id="no-model"),
    pytest.param(
        lambda: {"model": build_tiny_lm(), "config": {"vocab_size": 40}},
        ["dict", "PretrainedConfig"],
        id="config-wrong-type",
    ),
    pytest.param(
        lambda: {"model": make_module_without_source(), "config": {"width": 2},
                 "model_name": "hfl_hub_exec"},
        ["source file", "hfl_fake_models"],
        id="no-source-file",
    ),
    pytest.param(
        lambda: {"model": build_plain_net(), "config": dict(PLAIN_VALUES), "model_name": "bert"},
        ["'bert'", "built-in transformers model type"],
        id="builtin-model-name",
    ),
]


@pytest.mark.parametrize(("make_arguments", "fragments"), REJECTED)
def test_rejected_request_pushes_nothing(hub, repo_id, tmp_path, make_arguments, fragments):
    manager = make_manager(tmp_path, repo_id)
    before = files_under(manager.local_dir)
    with pytest.raises(RegistrationError) as caught:
        manager.register_custom_model(**make_arguments(), push_to_hub=True)

    for fragment in fragments:
        assert fragment in str(caught.value)
    assert files_under(manager.local_dir) == before
    assert owner_api().repo_exists(repo_id) is False
    assert hub.stats["commit"] == 0
    assert hub.stats["create_repo"] == 0


def test_push_without_repo_id_raises(hub, tmp_path):
    manager = make_manager(tmp_path, None)
    before = files_under(manager.local_dir)
    with pytest.raises(RepoIdRequiredError, match="repo_id"):
        manager.register_custom_model(build_tiny_lm(), push_to_hub=True)

    assert files_under(manager.local_dir) == before
    assert hub.stats["any"] == 0
