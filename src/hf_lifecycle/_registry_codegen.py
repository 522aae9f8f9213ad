"""Generate the configuration and modeling files that wrap a plain ``torch.nn.Module``.

The generated files import only the standard library, torch, transformers and the shipped user
modules (as flat relative imports). They are real source files: the same text is written to the
model folder and executed in this process, so the classes registered here are the classes a
loader gets.

NOTE: the generated code has been run with transformers 5 only. pyproject allows 4.46 and later,
where loading builds models on a real device and ties weights differently.
"""

from __future__ import annotations

import dataclasses
import inspect
import keyword
import linecache
import logging
import math
import numbers
import re
import sys
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from transformers import PretrainedConfig

from .errors import RegistrationError

logger = logging.getLogger(__name__)

# Attribute of the generated wrapper that stores the user's module, so checkpoint keys are the
# module's own parameter names behind the prefix "net.".
WRAPPED_ATTRIBUTE = "net"
# Package under which generated modules run in this process, outside the "transformers." names.
GENERATED_PACKAGE = "_hf_lifecycle_models"
# Keys that transformers writes into every config.json itself.
RESERVED_CONFIG_KEYS = frozenset(
    {"model_type", "transformers_version", "architectures", "auto_map", "name_or_path"}
)
# Arguments that PretrainedConfig.__init__ in transformers 4.x reads with kwargs.pop(name, default),
# so an attribute set before super().__init__() would be overwritten with the default.
_INIT_KWARGS = frozenset(
    {
        "tie_word_embeddings",
        "num_labels",
        "is_decoder",
        "add_cross_attention",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "sep_token_id",
        "decoder_start_token_id",
    }
)
_COMMON_TIED_KEY = re.compile(r"^[A-Za-z0-9_.]+(weight|bias)$")


@dataclass(frozen=True)
class ConstructorCall:
    """Constructor call of the user's module in the generated wrapper.

    ``passes_config`` is the name of the parameter that receives the whole config (or None).
    ``keys`` are parameter names passed as ``name=config.name``.
    """

    class_name: str
    passes_config: str | None
    positional_config: bool
    keys: tuple[str, ...]

    def render(self) -> str:
        arguments = []
        if self.passes_config is not None:
            positional = self.positional_config
            arguments.append("config" if positional else f"{self.passes_config}=config")
        arguments.extend(f"{key}=config.{key}" for key in self.keys)
        return f"{self.class_name}({', '.join(arguments)})"


def _describe(value: Any) -> str:
    if isinstance(value, types.LambdaType) and value.__name__ == "<lambda>":
        return "a lambda"
    if callable(value):
        return f"a callable ({type(value).__name__})"
    return f"a {type(value).__module__}.{type(value).__qualname__}"


def json_value(value: Any, key: str) -> Any:
    """Return ``value`` as a plain JSON value, or raise naming ``key`` (a dotted path).

    Tuples become lists and numpy-style numbers become int or float. Non-finite floats are
    rejected because the generated source writes each value as a Python literal.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        if not math.isfinite(number):
            raise RegistrationError(
                f"Config value {key!r} is {number}. Use a finite number or a string."
            )
        return number
    if isinstance(value, (list, tuple)):
        return [json_value(item, f"{key}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, Mapping):
        result = {}
        for item_key, item in value.items():
            if not isinstance(item_key, str):
                raise RegistrationError(
                    f"Config value {key!r} has the key {item_key!r} of type "
                    f"{type(item_key).__name__}; JSON objects need string keys."
                )
            result[item_key] = json_value(item, f"{key}.{item_key}")
        return result
    raise RegistrationError(
        f"Config value {key!r} is {_describe(value)}, which config.json cannot store. Config "
        "values must be plain JSON values (str, int, float, bool, None, and lists or dicts of "
        "them): store a name or a number and build the object inside the module."
    )


def check_config_serializable(config: PretrainedConfig) -> None:
    """Raise if a config contains a value that config.json cannot store."""
    for key, value in config.to_dict().items():
        if key == "id2label" and isinstance(value, Mapping):
            value = {str(label_id): label for label_id, label in value.items()}
        json_value(value, key)


def _is_standard_key(key: str) -> bool:
    return key in _INIT_KWARGS or inspect.getattr_static(PretrainedConfig, key, None) is not None


def config_values(config: Any) -> tuple[dict[str, Any], str | None]:
    """Turn a dict, a dataclass instance or a built-in PretrainedConfig into checked values.

    Returns the values and the ``model_type`` entry of a dict or dataclass (None when absent).
    Every key becomes an argument of the generated config class, so it must be an identifier that
    is not a Python keyword, does not start with "_", and is not a method or read-only property of
    PretrainedConfig.
    """
    if isinstance(config, PretrainedConfig):
        raw = config.to_diff_dict()
        for key in ("transformers_version", "model_type", "architectures", "auto_map"):
            raw.pop(key, None)
    elif isinstance(config, Mapping):
        raw = dict(config)
    else:
        raw = dataclasses.asdict(config)
    model_type = raw.pop("model_type", None)
    if model_type is not None and not isinstance(model_type, str):
        raise RegistrationError(f"Config key 'model_type' must be a string, not {model_type!r}.")
    values = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not key.isidentifier() or keyword.iskeyword(key):
            raise RegistrationError(
                f"Config key {key!r} is not a valid Python identifier, but the generated config "
                "class takes every key as an argument. Use names such as 'hidden_size'."
            )
        if key.startswith("_") or key in RESERVED_CONFIG_KEYS:
            raise RegistrationError(
                f"Config key {key!r} is reserved by transformers' config.json. Rename it."
            )
        standard = inspect.getattr_static(PretrainedConfig, key, None)
        if callable(standard) or (isinstance(standard, property) and standard.fset is None):
            raise RegistrationError(
                f"Config key {key!r} would replace PretrainedConfig.{key}. Rename it."
            )
        if key == "id2label" and isinstance(value, Mapping):
            value = {str(label_id): label for label_id, label in value.items()}
        values[key] = json_value(value, key)
    return values, model_type


def constructor_call(module_class: type, has_key: Callable[[str], bool]) -> ConstructorCall:
    """Match the module's ``__init__`` parameters to config keys, following the documented contract.

    A parameter named ``config`` receives the config object, every other parameter for which
    ``has_key`` is true receives the config attribute of the same name, and any other parameter
    keeps its default. ``*args`` and ``**kwargs`` receive nothing.
    """
    name = module_class.__qualname__
    try:
        signature = inspect.signature(module_class)
    except (TypeError, ValueError) as err:
        raise RegistrationError(f"Cannot read the signature of {name}.__init__: {err}") from err
    passes_config = None
    positional_config = False
    keys: list[str] = []
    missing: list[str] = []
    defaulted: list[str] = []
    for parameter in signature.parameters.values():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        positional_only = parameter.kind is parameter.POSITIONAL_ONLY
        if parameter.name == "config":
            passes_config = parameter.name
            positional_config = positional_only
        elif has_key(parameter.name) and not positional_only:
            keys.append(parameter.name)
        elif parameter.default is parameter.empty:
            missing.append(parameter.name)
        else:
            defaulted.append(parameter.name)
    if missing:
        raise RegistrationError(
            f"Cannot rebuild {name} from the config: {name}.__init__ requires {missing}, which "
            "are not config keys (positional-only parameters cannot be matched by name). Add them "
            "to the config, give them defaults, or take a single `config` parameter."
        )
    if defaulted:
        logger.warning(
            "%s.__init__ parameters %s are not config keys: a model loaded from the registered "
            "folder uses their defaults",
            name,
            defaulted,
        )
    return ConstructorCall(module_class.__name__, passes_config, positional_config, tuple(keys))


def tied_weights_keys(module: Any) -> dict[str, str]:
    """Map every parameter or buffer name that aliases an earlier one to that earlier name.

    Keys carry the wrapper prefix. transformers 5 saves only the first name of each shared tensor
    and re-ties the others on load, but only for aliases declared in ``_tied_weights_keys``.
    """
    first_name: dict[int, str] = {}
    tied: dict[str, str] = {}
    named = [*module.named_parameters(remove_duplicate=False)]
    named += [*module.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        source = first_name.setdefault(id(tensor), name)
        if source != name:
            tied[f"{WRAPPED_ATTRIBUTE}.{name}"] = f"{WRAPPED_ATTRIBUTE}.{source}"
    if not all(_COMMON_TIED_KEY.match(key) for pair in tied.items() for key in pair):
        # transformers reads keys that do not end in weight/bias as regular expressions.
        tied = {re.escape(key) + "$": re.escape(value) + "$" for key, value in tied.items()}
    return tied


def class_prefix(model_type: str) -> str:
    parts = re.split(r"[-_]+", model_type)
    return "".join(part[:1].upper() + part[1:] for part in parts if part)


def module_suffix(model_type: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "_", model_type).lower()


def render_config_source(model_type: str, class_name: str, values: dict[str, Any]) -> str:
    """Write a PretrainedConfig subclass whose defaults are ``values``.

    Keys that PretrainedConfig defines (such as ``tie_word_embeddings`` or ``id2label``) go to
    ``PretrainedConfig.__init__`` through ``kwargs``, and the others become attributes.
    """
    own = {key: value for key, value in values.items() if not _is_standard_key(key)}
    standard = {key: value for key, value in values.items() if key not in own}
    needs_copy = any(isinstance(value, (list, dict)) for value in own.values())
    lines = [
        f'"""Configuration of the {model_type} model type, generated by hf-lifecycle."""',
        "",
    ]
    if needs_copy:
        lines += ["import copy", ""]
    lines += [
        "from transformers import PretrainedConfig",
        "",
        "",
        f"class {class_name}(PretrainedConfig):",
        f"    model_type = {model_type!r}",
        "",
        "    def __init__(",
        "        self,",
    ]
    lines += [f"        {key}={value!r}," for key, value in own.items()]
    lines += ["        **kwargs,", "    ):"]
    for key, value in own.items():
        copied = f"copy.deepcopy({key})" if isinstance(value, (list, dict)) else key
        lines.append(f"        self.{key} = {copied}")
    lines += [f"        kwargs.setdefault({key!r}, {value!r})" for key, value in standard.items()]
    lines += ["        super().__init__(**kwargs)", ""]
    return "\n".join(lines)


def render_modeling_source(
    *,
    model_type: str,
    class_name: str,
    config_import: tuple[str, str],
    module_import: tuple[str, str],
    call: ConstructorCall,
    tied: dict[str, str],
) -> str:
    """Write the PreTrainedModel wrapper around the user's module.

    ``config_import`` and ``module_import`` are (flat module name, class name) pairs.
    """
    module_class = module_import[1]
    attribute = WRAPPED_ATTRIBUTE
    imports = sorted([config_import, module_import])
    lines = [
        f'"""Model class of the {model_type} model type, generated by hf-lifecycle.',
        "",
        f"{class_name} rebuilds {module_class} from the config and keeps it as `self.{attribute}`,",
        f"so checkpoint keys are {module_class}'s own parameter names behind the prefix "
        f'"{attribute}.".',
        '"""',
        "",
        "import torch",
        "from transformers import PreTrainedModel",
        "",
    ]
    lines += [f"from .{module} import {name}" for module, name in imports]
    lines += [
        "",
        "",
        f"class {class_name}(PreTrainedModel):",
        f"    config_class = {config_import[1]}",
    ]
    if tied:
        lines.append("    _tied_weights_keys = {")
        lines += [f"        {target!r}: {source!r}," for target, source in tied.items()]
        lines.append("    }")
    lines += [
        "",
        "    def __init__(self, config):",
        "        super().__init__(config)",
        f"        self.{attribute} = self._build_module(config)",
        "        # from_pretrained builds the model on the meta device, then loads the checkpoint.",
        f"        tensors = [*self.{attribute}.parameters(), *self.{attribute}.buffers()]",
        "        self._built_on_meta = any(tensor.is_meta for tensor in tensors)",
        "        self._reference = {}",
        "        self.post_init()",
        "",
        "    @staticmethod",
        "    def _build_module(config):",
        f"        return {call.render()}",
        "",
        "    def forward(self, *args, **kwargs):",
        f"        return self.{attribute}(*args, **kwargs)",
        "",
        "    def _init_weights(self, module):",
        f"        # {module_class} initializes itself in its constructor, so a model built",
        "        # on a real device needs nothing here. After from_pretrained, the tensors the",
        "        # checkpoint did not provide (non-persistent buffers, missing keys) get the",
        "        # values of a fresh module built on the CPU from the same config.",
        "        if not self._built_on_meta:",
        "            return",
        "        tensors = dict(module.named_parameters(recurse=False))",
        "        tensors.update(module.named_buffers(recurse=False))",
        "        pending = {",
        "            name: tensor",
        "            for name, tensor in tensors.items()",
        '            if tensor is not None and not getattr(tensor, "_is_hf_initialized", False)',
        "        }",
        "        if pending:",
        "            source = self._reference_for(module)",
        "            with torch.no_grad():",
        "                for name, tensor in pending.items():",
        "                    tensor.copy_(getattr(source, name))",
        "        if module is self:",
        "            self._reference.clear()",
        "",
        "    def _reference_for(self, module):",
        "        if not self._reference:",
        '            with torch.device("cpu"), torch.random.fork_rng(devices=[]):',
        '                self._reference["module"] = self._build_module(self.config)',
        f"            paths = {{sub: path for path, sub in self.{attribute}.named_modules()}}",
        '            self._reference["paths"] = paths',
        '        path = self._reference["paths"][module]',
        '        return self._reference["module"].get_submodule(path)',
        "",
    ]
    return "\n".join(lines)


def generated_package(model_type: str) -> str:
    return f"{GENERATED_PACKAGE}.{module_suffix(model_type)}"


def load_generated(
    model_type: str, generated: dict[str, str], aliases: dict[str, types.ModuleType]
) -> dict[str, types.ModuleType]:
    """Execute generated sources in this process and return their modules by flat name.

    ``aliases`` maps flat names of shipped user modules to the modules already loaded here, so a
    generated ``from .plain_module import PlainNet`` gets the user's own class object.
    """
    package_name = generated_package(model_type)
    for name in (GENERATED_PACKAGE, package_name):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = []
            sys.modules[name] = package
    for flat, module in aliases.items():
        sys.modules[f"{package_name}.{flat}"] = module
    loaded = {}
    # The configuration module first: the modeling module imports it.
    for flat in sorted(generated, key=lambda name: not name.startswith("configuration_")):
        text = generated[flat]
        module_name = f"{package_name}.{flat}"
        filename = f"<hf-lifecycle {model_type}/{flat}.py>"
        # Registered so tracebacks through generated code show its lines.
        linecache.cache[filename] = (len(text), None, text.splitlines(keepends=True), filename)
        module = types.ModuleType(module_name)
        module.__package__ = package_name
        sys.modules[module_name] = module
        try:
            exec(compile(text, filename, "exec"), module.__dict__)
        except Exception as err:
            del sys.modules[module_name]
            raise RegistrationError(f"The generated {flat}.py failed to import: {err!r}") from err
        loaded[flat] = module
    return loaded
