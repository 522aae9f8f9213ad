"""Validate a registration request and work out everything to write and register.

Nothing here touches the output folder. :func:`plan_registration` either raises
:class:`RegistrationError` or returns a :class:`RegistrationPlan` that the writer turns into
files and that :func:`register_auto_classes` enters into the transformers Auto mappings.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from . import _registry_codegen as codegen
from ._registry_sources import check_class_importable, collect_sources, flat_name, verify_loadable
from .errors import RegistrationError

logger = logging.getLogger(__name__)

_MODEL_TYPE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
_TASK_SUFFIX = re.compile(r"For([A-Z][A-Za-z0-9]*)$")


@dataclass
class _Registration:
    """A registration this process made under one model type, kept to tell a repeat from a clash."""

    identity: tuple[Any, ...]
    config_class: type
    model_class: type
    generated: dict[str, str]


_REGISTERED: dict[str, _Registration] = {}
LOCK = threading.Lock()


@dataclass
class RegistrationPlan:
    model_type: str
    config_class: type
    model_class: type
    task_auto_class: str | None
    auto_map: dict[str, str]
    # Flat module name to source text, for user modules and generated modules alike.
    sources: dict[str, str]
    requirements: list[str]
    # A model built on the meta device from the config. Its save_pretrained writes the weights.
    probe: PreTrainedModel
    state_dict: dict[str, torch.Tensor]
    target: Path
    identity: tuple[Any, ...]
    generated: dict[str, str]

    @property
    def auto_classes(self) -> tuple[str, ...]:
        return tuple(self.auto_map)


def _unwrap(model: nn.Module) -> nn.Module:
    """Strip torch.compile and data-parallel wrappers, which save under other parameter names."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
            continue
        return model


def _task_auto_class(cls: type) -> str | None:
    """Find the task Auto class for ``cls``, from ``_auto_class`` or else from its name.

    ``_auto_class`` is the attribute ``register_for_auto_class`` sets. A value of "AutoModel" (or
    none) falls back to a class name ending in ``For<Task>`` when transformers has
    ``AutoModelFor<Task>``.
    """
    declared = getattr(cls, "_auto_class", None)
    if declared is not None and not isinstance(declared, str):
        declared = getattr(declared, "__name__", str(declared))
    if declared and declared != "AutoModel":
        if not declared.startswith("AutoModelFor") or not hasattr(transformers, declared):
            raise RegistrationError(
                f"{cls.__qualname__}._auto_class is {declared!r}, which is not a transformers "
                "AutoModelFor... class. Use a name such as 'AutoModelForCausalLM'."
            )
        return declared
    match = _TASK_SUFFIX.search(cls.__name__)
    if match is not None and hasattr(transformers, f"AutoModelFor{match.group(1)}"):
        return f"AutoModelFor{match.group(1)}"
    return None


def _check_model_type(model_type: str, source: str) -> None:
    if not _MODEL_TYPE.match(model_type):
        raise RegistrationError(
            f"Invalid model type {model_type!r} ({source}): use 1 to 64 letters, digits, '_' or "
            "'-', starting with a letter, such as 'tiny_mlp'."
        )
    if model_type in CONFIG_MAPPING_NAMES:
        raise RegistrationError(
            f"Model type {model_type!r} ({source}) is a built-in transformers model type. Pick "
            "another name with model_name=, such as 'my_" + model_type.replace("-", "_") + "'."
        )


def _check_clash(model_type: str, config_class: type | None, identity: tuple[Any, ...]) -> None:
    """Raise if ``model_type`` already maps to a class other than the one being registered."""
    prior = _REGISTERED.get(model_type)
    if prior is not None and prior.identity == identity:
        return
    if model_type not in CONFIG_MAPPING:
        return
    existing = CONFIG_MAPPING[model_type]
    if config_class is not None and existing is config_class:
        return
    raise RegistrationError(
        f"Model type {model_type!r} is already registered in this process for "
        f"{existing.__module__}.{existing.__qualname__}. Pick another model_name, or register "
        "the class registered before."
    )


def _check_target(target: Path, model_type: str) -> None:
    """Allow an existing target folder only if it contains an earlier registration of the type."""
    if not target.exists():
        return
    config_file = target / "config.json"
    try:
        written = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        written = None
    if (
        not target.is_dir()
        or not isinstance(written, dict)
        or written.get("model_type") != model_type
        or "auto_map" not in written
    ):
        raise RegistrationError(
            f"Output folder {target} exists and does not contain a registered model of type "
            f"{model_type!r}, so it is left alone. Choose another output_dir or remove it."
        )


def _compare_state(
    expected: Mapping[str, torch.Tensor], rebuilt: Mapping[str, torch.Tensor], class_label: str
) -> None:
    missing = sorted(set(expected) - set(rebuilt))
    unexpected = sorted(set(rebuilt) - set(expected))
    shapes = sorted(
        f"{key}: {tuple(rebuilt[key].shape)} instead of {tuple(expected[key].shape)}"
        for key in set(expected) & set(rebuilt)
        if rebuilt[key].shape != expected[key].shape
    )
    if missing or unexpected or shapes:
        details = []
        if missing:
            details.append(f"missing {missing[:5]}")
        if unexpected:
            details.append(f"unexpected {unexpected[:5]}")
        if shapes:
            details.append(f"different shapes {shapes[:5]}")
        raise RegistrationError(
            f"{class_label} rebuilt from the config does not match the model: "
            + "; ".join(details)
            + ". The config must hold the values the model was built with."
        )


def _build_probe(model_class: type, config: PretrainedConfig, dtype: torch.dtype) -> Any:
    """Build ``model_class(config)`` on the meta device, as transformers 5 from_pretrained does."""
    try:
        with torch.device("meta"):
            probe = model_class(config)
    except Exception as err:
        raise RegistrationError(
            f"Building {model_class.__qualname__} from the config on the meta device failed "
            f"({err!r}); from_pretrained builds the model the same way, so loading would fail too."
        ) from err
    return probe.to(dtype=dtype)


def _model_dtype(module: nn.Module) -> torch.dtype:
    for tensor in module.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.get_default_dtype()


def _check_config_type(config: Any) -> None:
    accepted = (
        isinstance(config, (PretrainedConfig, Mapping))
        or (dataclasses.is_dataclass(config) and not isinstance(config, type))
    )
    if not accepted:
        raise RegistrationError(
            f"Invalid config: got a {type(config).__module__}.{type(config).__qualname__}, "
            "expected a transformers.PretrainedConfig, a dict, or a dataclass instance."
        )


def _plan_pretrained(
    model: PreTrainedModel, config: Any, model_name: str | None, output_dir: Path
) -> RegistrationPlan:
    model_class = type(model)
    if config is None:
        config = model.config
    if not isinstance(config, PretrainedConfig):
        raise RegistrationError(
            f"Invalid config: got a {type(config).__qualname__}, but a PreTrainedModel such as "
            f"{model_class.__qualname__} takes a transformers.PretrainedConfig (or omit config= "
            "to use model.config)."
        )
    config_class = type(config)
    if model_class.config_class is not config_class:
        raise RegistrationError(
            f"{model_class.__qualname__}.config_class is {model_class.config_class!r} but the "
            f"config is a {config_class.__qualname__}. Set config_class = "
            f"{config_class.__name__} on the model class."
        )
    model_type = config_class.model_type
    if not model_type:
        raise RegistrationError(
            f"{config_class.__qualname__} has no model_type. Set a class attribute such as "
            "model_type = 'my_model'."
        )
    if model_name is not None and model_name != model_type:
        raise RegistrationError(
            f"model_name {model_name!r} differs from {config_class.__qualname__}.model_type "
            f"{model_type!r}. Omit model_name, or change model_type on the config class."
        )
    _check_model_type(model_type, f"{config_class.__qualname__}.model_type")
    if getattr(model, "hf_quantizer", None) is not None:
        raise RegistrationError(
            "The model is quantized, and registration saves full-precision custom models. "
            "Dequantize it first."
        )
    model_module = check_class_importable(model_class, "model class")
    config_module = check_class_importable(config_class, "config class")
    identity = (model_class, config_class)
    _check_clash(model_type, config_class, identity)
    _check_model_mapping(config_class, model_type, model_class, identity)

    shipped = collect_sources([model_module, config_module], reserved=set())
    sources = {name: source.text for name, source in shipped.items()}
    config_copy = copy.deepcopy(config)
    codegen.check_config_serializable(config_copy)
    probe = _build_probe(model_class, config_copy, _model_dtype(model))
    state_dict = model.state_dict()
    _compare_state(state_dict, probe.state_dict(), model_class.__qualname__)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        probe.generation_config = copy.deepcopy(generation_config)

    return _plan(
        model_type, config_class, model_class, _task_auto_class(model_class),
        config_entry=f"{flat_name(config_module.__name__)}.{config_class.__name__}",
        model_entry=f"{flat_name(model_module.__name__)}.{model_class.__name__}",
        sources=sources, probe=probe, state_dict=state_dict, output_dir=output_dir,
        identity=identity, generated={},
    )


def _plain_model_type(model_name: str | None, from_values: str | None) -> str:
    if model_name is None:
        if from_values is None:
            raise RegistrationError(
                "model_name is required for a plain torch.nn.Module unless the config has a "
                "'model_type' entry: pass model_name='my_model' (it becomes the model_type)."
            )
        return from_values
    if from_values is not None and from_values != model_name:
        raise RegistrationError(
            f"model_name {model_name!r} differs from the config's model_type {from_values!r}. "
            "Omit one of them."
        )
    return model_name


def _check_model_mapping(
    config_class: type, model_type: str, model_class: type | None, identity: tuple[Any, ...]
) -> None:
    """Raise if AutoModel maps ``config_class`` to a class other than ``model_class``.

    A generated wrapper is not known yet (``model_class`` None): then only the wrapper this
    process generated earlier for the same ``identity`` is accepted.
    """
    if config_class not in MODEL_MAPPING:
        return
    mapped = MODEL_MAPPING[config_class]
    prior = _REGISTERED.get(model_type)
    repeat = prior is not None and prior.identity == identity and mapped is prior.model_class
    if mapped is model_class or repeat:
        return
    raise RegistrationError(
        f"AutoModel already maps {config_class.__qualname__} to "
        f"{mapped.__module__}.{mapped.__qualname__}. Register that class, or give the model its "
        "own config class and model_type."
    )


def _plan_plain(
    model: nn.Module, config: Any, model_name: str | None, output_dir: Path
) -> RegistrationPlan:
    module_class = type(model)
    if config is None:
        config = getattr(model, "config", None)
    if config is None:
        raise RegistrationError(
            f"config is required for the plain torch.nn.Module {module_class.__qualname__}: pass "
            "config= as a PretrainedConfig, a dict, or a dataclass instance holding the values "
            "its __init__ takes."
        )
    _check_config_type(config)
    module_file = check_class_importable(module_class, "model class")
    user_config = isinstance(config, PretrainedConfig) and not type(config).__module__.startswith(
        "transformers."
    )
    tied = codegen.tied_weights_keys(model)

    if user_config:
        config_class = type(config)
        config_module = check_class_importable(config_class, "config class")
        model_type = config_class.model_type
        if not model_type:
            raise RegistrationError(
                f"{config_class.__qualname__} has no model_type. Set a class attribute such as "
                "model_type = 'my_model'."
            )
        if model_name is not None and model_name != model_type:
            raise RegistrationError(
                f"model_name {model_name!r} differs from {config_class.__qualname__}.model_type "
                f"{model_type!r}. Omit model_name, or change model_type on the config class."
            )
        _check_model_type(model_type, f"{config_class.__qualname__}.model_type")
        _check_model_mapping(config_class, model_type, None, (module_class, config_class))
        config_instance = copy.deepcopy(config)
        codegen.check_config_serializable(config_instance)
        if tied:
            if getattr(config_instance, "tie_word_embeddings", True) is False:
                raise _tie_conflict(module_class, tied)
            config_instance.tie_word_embeddings = True
        call = codegen.constructor_call(module_class, lambda key: hasattr(config_instance, key))
        config_import = (flat_name(config_module.__name__), config_class.__name__)
        roots = [module_file, config_module]
        values: dict[str, Any] = {}
    else:
        values, from_values = codegen.config_values(config)
        model_type = _plain_model_type(model_name, from_values)
        _check_model_type(model_type, "model_name" if model_name else "the config's model_type")
        if tied:
            if values.get("tie_word_embeddings", True) is False:
                raise _tie_conflict(module_class, tied)
            values["tie_word_embeddings"] = True
        call = codegen.constructor_call(module_class, lambda key: key in values)
        config_class = None
        config_import = (
            f"configuration_{codegen.module_suffix(model_type)}",
            f"{codegen.class_prefix(model_type)}Config",
        )
        roots = [module_file]

    task = _task_auto_class(module_class)
    prefix = codegen.class_prefix(model_type)
    wrapper_name = f"{prefix}For{task.removeprefix('AutoModelFor')}" if task else f"{prefix}Model"
    if wrapper_name in (module_class.__name__, config_import[1]):
        wrapper_name = f"{prefix}PreTrainedWrapper"
    modeling_name = f"modeling_{codegen.module_suffix(model_type)}"
    generated_names = {modeling_name} | ({config_import[0]} if config_class is None else set())
    shipped = collect_sources(roots, reserved=generated_names)

    generated = {
        modeling_name: codegen.render_modeling_source(
            model_type=model_type,
            class_name=wrapper_name,
            config_import=config_import,
            module_import=(flat_name(module_class.__module__), module_class.__name__),
            call=call,
            tied=tied,
        )
    }
    if config_class is None:
        generated[config_import[0]] = codegen.render_config_source(
            model_type, config_import[1], values
        )
    identity = (module_class, type(config) if user_config else None)
    _check_clash(model_type, config_class, identity)

    prior = _REGISTERED.get(model_type)
    if prior is not None and prior.identity == identity and prior.generated == generated:
        config_class, model_class = prior.config_class, prior.model_class
    else:
        aliases: dict[str, ModuleType] = {flat_name(module_file.__name__): module_file}
        if user_config:
            aliases[config_import[0]] = config_module
        loaded = codegen.load_generated(model_type, generated, aliases)
        model_class = getattr(loaded[modeling_name], wrapper_name)
        if config_class is None:
            config_class = getattr(loaded[config_import[0]], config_import[1])
    if not user_config:
        config_instance = config_class()

    probe = _build_probe(model_class, config_instance, _model_dtype(model))
    own_state = model.state_dict()
    _compare_state(
        own_state, getattr(probe, codegen.WRAPPED_ATTRIBUTE).state_dict(), module_class.__qualname__
    )
    state_dict = {f"{codegen.WRAPPED_ATTRIBUTE}.{key}": value for key, value in own_state.items()}

    sources = {name: source.text for name, source in shipped.items()}
    sources.update(generated)
    return _plan(
        model_type, config_class, model_class, task,
        config_entry=f"{config_import[0]}.{config_import[1]}",
        model_entry=f"{modeling_name}.{wrapper_name}",
        sources=sources, probe=probe, state_dict=state_dict, output_dir=output_dir,
        identity=identity, generated=generated,
    )


def _plan(
    model_type, config_class, model_class, task, *, config_entry, model_entry, sources, probe,
    state_dict, output_dir, identity, generated,
) -> RegistrationPlan:
    """Assemble a plan whose ``auto_map`` points the Auto classes at the shipped sources."""
    auto_map = {"AutoConfig": config_entry, "AutoModel": model_entry}
    if task is not None:
        auto_map[task] = model_entry
    return RegistrationPlan(
        model_type=model_type,
        config_class=config_class,
        model_class=model_class,
        task_auto_class=task,
        auto_map=auto_map,
        sources=sources,
        requirements=verify_loadable(sources),
        probe=probe,
        state_dict=state_dict,
        target=output_dir / model_type,
        identity=identity,
        generated=generated,
    )


def _tie_conflict(module_class: type, tied: dict[str, str]) -> RegistrationError:
    pairs = [f"{target} = {source}" for target, source in list(tied.items())[:3]]
    return RegistrationError(
        f"{module_class.__qualname__} shares tensors ({', '.join(pairs)}) but the config sets "
        "tie_word_embeddings=False, so transformers would neither save nor restore the shared "
        "copies. Set tie_word_embeddings=True or stop sharing the tensors."
    )


def plan_registration(
    model: Any, config: Any, *, model_name: str | None, output_dir: Path
) -> RegistrationPlan:
    """Validate the request and return the plan, or raise :class:`RegistrationError`."""
    if model is None:
        raise RegistrationError(
            "model is required to register a custom model: pass model= or call set_model first."
        )
    if not isinstance(model, nn.Module):
        raise RegistrationError(
            f"Invalid model: got a {type(model).__module__}.{type(model).__qualname__}, expected "
            "a torch.nn.Module (a transformers PreTrainedModel or a plain module)."
        )
    if model_name is not None and not isinstance(model_name, str):
        raise RegistrationError(f"model_name must be a string, not {type(model_name).__name__}.")
    model = _unwrap(model)
    if isinstance(model, PreTrainedModel):
        plan = _plan_pretrained(model, config, model_name, output_dir)
    else:
        plan = _plan_plain(model, config, model_name, output_dir)
    _check_target(plan.target, plan.model_type)
    return plan


def register_auto_classes(plan: RegistrationPlan) -> None:
    """Enter the plan's classes into AutoConfig, AutoModel and the task Auto class, if any."""
    AutoConfig.register(plan.model_type, plan.config_class, exist_ok=True)
    AutoModel.register(plan.config_class, plan.model_class, exist_ok=True)
    if plan.task_auto_class is not None:
        auto_class = getattr(transformers, plan.task_auto_class)
        auto_class.register(plan.config_class, plan.model_class, exist_ok=True)
    _REGISTERED[plan.model_type] = _Registration(
        plan.identity, plan.config_class, plan.model_class, plan.generated
    )
    logger.info(
        "Registered model type %s: %s with %s for %s",
        plan.model_type,
        plan.model_class.__qualname__,
        plan.config_class.__qualname__,
        ", ".join(plan.auto_classes),
    )
