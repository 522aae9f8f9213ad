"""Write a registration plan as a self-contained model folder, all at once or not at all.

The folder is filled under a temporary name beside the target (weights, config.json, sources,
README.md), every file is flushed to disk, and the folder is renamed into place. An earlier folder
of the same model type is renamed aside first and deleted after the new one is in place, so a
reader never sees a half-written folder, though the target is missing between the two renames.
On any failure the temporary folder, and any parent folders this call created, are removed.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from ._io import TEMP_PREFIX, fsync_dir
from ._registry_plan import RegistrationPlan
from .errors import RegistrationError

logger = logging.getLogger(__name__)

CARD_TAGS = ["hf-lifecycle", "custom_code"]
# Files save_pretrained may write besides config.json that belong in the folder.
_WEIGHT_FILE_SUFFIXES = (".safetensors",)
_WEIGHT_FILE_NAMES = ("model.safetensors.index.json", "generation_config.json")


def _write_file(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _write_weights(plan: RegistrationPlan, folder: Path) -> list[str]:
    """Save the weights with save_pretrained, which decides how tied and shared tensors are stored.

    save_pretrained also writes config.json and, for a class set up with register_for_auto_class,
    copies of its source files. It writes into a scratch folder and only the weight files move on.
    """
    scratch = folder / f"{TEMP_PREFIX}save_pretrained"
    try:
        plan.probe.save_pretrained(scratch, state_dict=plan.state_dict)
    except (ValueError, RuntimeError, TypeError) as err:
        raise RegistrationError(f"Saving the weights with save_pretrained failed: {err}") from err
    written = []
    for path in sorted(scratch.iterdir()):
        if path.name.endswith(_WEIGHT_FILE_SUFFIXES) or path.name in _WEIGHT_FILE_NAMES:
            os.replace(path, folder / path.name)
            written.append(path.name)
    shutil.rmtree(scratch)
    return written


def _config_json(plan: RegistrationPlan) -> str:
    # save_pretrained has set dtype and architectures on the probe's config.
    config = plan.probe.config
    config.auto_map = dict(plan.auto_map)
    if not getattr(config, "architectures", None):
        config.architectures = [plan.model_class.__name__]
    return config.to_json_string(use_diff=True)


def render_model_card(
    plan: RegistrationPlan, *, description: str, repo_id: str | None, files: list[str]
) -> str:
    data = ModelCardData(library_name="transformers", tags=list(CARD_TAGS))
    location = repo_id if repo_id is not None else f"path/to/{plan.target.name}"
    auto_class = plan.task_auto_class or "AutoModel"
    code_files = ", ".join(f"`{name}`" for name in files if name.endswith(".py"))
    requirements = ", ".join(f"`{name}`" for name in plan.requirements) or "none"
    body = [
        f"# {plan.model_type}",
        "",
        description.strip() or f"A custom `{plan.model_type}` model.",
        "",
        "## Usage",
        "",
        "```python",
        f"from transformers import {auto_class}",
        "",
        f'model = {auto_class}.from_pretrained("{location}", trust_remote_code=True)',
        "```",
        "",
        f"The model class is `{plan.model_class.__name__}` with the configuration class "
        f"`{plan.config_class.__name__}`. Loading runs the code shipped in this repository "
        f"({code_files}), so read it before passing `trust_remote_code=True`.",
        "",
        f"Packages imported by that code: {requirements}.",
        "",
    ]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))
    return str(card)


def _missing_parents(path: Path) -> list[Path]:
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    return missing


def _replace_folder(temp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(temp, target)
        fsync_dir(target.parent)
        return
    previous = target.with_name(f"{TEMP_PREFIX}{target.name}-previous-{uuid.uuid4().hex[:8]}")
    os.rename(target, previous)
    try:
        os.rename(temp, target)
    except OSError:
        os.rename(previous, target)
        raise
    fsync_dir(target.parent)
    logger.info("Replaced the earlier registration folder %s", target)
    shutil.rmtree(previous, ignore_errors=True)


def write_model_folder(
    plan: RegistrationPlan, *, description: str, repo_id: str | None
) -> tuple[str, ...]:
    """Write the folder ``plan.target`` and return the relative paths of its files."""
    output_dir = plan.target.parent
    created = _missing_parents(output_dir)
    temp = output_dir / f"{TEMP_PREFIX}{plan.target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        temp.mkdir()
        files = _write_weights(plan, temp)
        for name, text in plan.sources.items():
            _write_file(temp / f"{name}.py", text)
            files.append(f"{name}.py")
        _write_file(temp / "config.json", _config_json(plan))
        files.append("config.json")
        files.sort()
        card = render_model_card(plan, description=description, repo_id=repo_id, files=files)
        _write_file(temp / "README.md", card)
        files = sorted([*files, "README.md"])
        for name in files:
            _fsync_file(temp / name)
            logger.debug("Wrote %s", plan.target / name)
        fsync_dir(temp)
        _replace_folder(temp, plan.target)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    logger.info("Wrote %d files for model type %s to %s", len(files), plan.model_type, plan.target)
    return tuple(files)
