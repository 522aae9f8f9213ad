"""Register custom architectures with the transformers Auto classes and save loadable folders.

:func:`register_custom_model` does two things with a model instance:

* It registers the config and model classes in this process, with ``AutoConfig.register``,
  ``AutoModel.register`` and, when the model declares one, a task Auto class such as
  ``AutoModelForCausalLM``. After that, ``AutoConfig.for_model(model_type)`` and
  ``AutoModel.from_config(config)`` build the model here.
* It writes a self-contained folder that ``AutoModel.from_pretrained(folder,
  trust_remote_code=True)`` loads on another machine with only torch and transformers installed
  (plus whatever packages the model code imports). The folder is what a Hub push uploads.

Two kinds of model are accepted:

* A ``transformers.PreTrainedModel`` subclass with its ``PretrainedConfig`` subclass. The config
  class must set ``model_type`` and the model class ``config_class``.
* A plain ``torch.nn.Module`` with a config given as a ``PretrainedConfig``, a dict or a dataclass
  instance. Registration generates ``modeling_<model_type>.py``, whose ``PreTrainedModel``
  wrapper rebuilds the module from the config and stores it as the attribute ``net``. Checkpoint
  keys are the module's own parameter names behind the prefix ``net.``, and ``forward`` passes
  every argument on to the module. It also generates ``configuration_<model_type>.py``, unless
  the config is an instance of your own ``PretrainedConfig`` subclass, which is shipped as is.

The contract for a plain module's ``__init__``: a parameter named ``config`` receives the config
object; every other parameter receives the config value of the same name; a parameter that is not
a config key keeps its default (a warning lists these, because a loaded model uses the default
even where the original was built with another value); ``*args`` and ``**kwargs`` receive
nothing. A required parameter that matches no config key, or a positional-only one, is a
:class:`~hf_lifecycle.errors.RegistrationError`. The module rebuilt from the config must have the
same parameter and buffer names and shapes as the instance passed in. Tensors the module shares
(such as an output layer tied to the embedding) are declared to transformers and re-tied on load,
and non-persistent buffers are recomputed by the module's own constructor.

The task Auto class comes from the model class attribute ``_auto_class`` (the attribute that
``register_for_auto_class`` sets), when it names an ``AutoModelFor...`` class, or else from a
class name ending in ``For<Task>`` when transformers has ``AutoModelFor<Task>``
(``TinyForCausalLM`` registers with ``AutoModelForCausalLM``).

What is shipped: the files defining the model and config classes and every user module they import
(same top-level package, or outside site-packages and the standard library), each saved under the
last component of its module name, with imports of user modules rewritten to the flat relative form
``from .layers import Block`` that transformers' remote-code loader follows. Importing a user
module as an object (``import pkg.layers`` or ``from pkg import layers``) is rejected, because the
loader cannot ship it. So are a class defined in ``__main__`` or without a source file, a source
that edits ``sys.path`` or names an absolute path, and a config value that config.json cannot
store (a lambda, a tensor): the error says what to change.

Concurrency: calls in one process are serialized by a lock, because they change the global
transformers mappings. Call it from one process only (rank 0): two processes writing the same
folder race on the final rename.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import RegistrationError

logger = logging.getLogger(__name__)

__all__ = ["RegisteredModel", "register_custom_model"]


@dataclass(frozen=True)
class RegisteredModel:
    """The result of :func:`register_custom_model`.

    ``folder`` is the written folder, ``output_dir / model_type``. ``model_class`` is the
    registered ``PreTrainedModel`` class: the generated wrapper for a plain module. ``files`` lists
    the paths written, relative to ``folder``. ``auto_classes`` names the Auto classes registered
    and written into the ``auto_map`` of config.json.
    """

    folder: Path
    model_type: str
    config_class: type
    model_class: type
    files: tuple[str, ...]
    auto_classes: tuple[str, ...]


def _require_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError as err:
        raise RegistrationError(
            "Registering custom models needs transformers, which is not installed: "
            'pip install "hf-lifecycle[transformers]"'
        ) from err


def register_custom_model(
    model: Any,
    config: Any = None,
    *,
    output_dir: str | os.PathLike[str],
    model_name: str | None = None,
    description: str = "",
    repo_id: str | None = None,
) -> RegisteredModel:
    """Register ``model``'s classes with the transformers Auto classes and write its folder.

    ``config`` may be omitted for a ``PreTrainedModel`` (its ``config`` is used). ``model_name``
    sets the ``model_type`` of a plain module; for a ``PreTrainedModel`` it must equal the config
    class's ``model_type``. It may not be a built-in transformers model type, nor a type this
    process registered for another class. ``description`` goes into the README.md model card, and
    ``repo_id`` into its usage example.

    Every check runs before anything is written; on any error the output folder is unchanged.
    Raises :class:`~hf_lifecycle.errors.RegistrationError` naming the problem and the fix.
    """
    _require_transformers()
    from . import _registry_plan, _registry_write

    if not isinstance(description, str):
        raise RegistrationError(f"description must be a string, not {type(description).__name__}.")
    if repo_id is not None and not isinstance(repo_id, str):
        raise RegistrationError(f"repo_id must be a string, not {type(repo_id).__name__}.")
    with _registry_plan.LOCK:
        plan = _registry_plan.plan_registration(
            model, config, model_name=model_name, output_dir=Path(output_dir)
        )
        files = _registry_write.write_model_folder(plan, description=description, repo_id=repo_id)
        _registry_plan.register_auto_classes(plan)
    return RegisteredModel(
        folder=plan.target,
        model_type=plan.model_type,
        config_class=plan.config_class,
        model_class=plan.model_class,
        files=files,
        auto_classes=plan.auto_classes,
    )
