"""Collect the source files a custom model needs, rewritten for transformers' remote-code loader.

transformers (``dynamic_module_utils``, read in 5.25) loads custom code from one flat folder. It
copies the file named in ``auto_map`` and every module that file imports with a line of the form
``from .name import ...``, found with a regular expression, and it raises for an absolute import
of a package that is not installed. So each user module the model needs is shipped as
``<last component of its name>.py`` in the same folder, and every import of a user module is
rewritten to ``from .<that name> import ...``.

A module counts as user code when it belongs to the same top-level package as the model or config
class, or when it lives outside the standard library and site-packages and belongs to no installed
distribution. Everything else (torch, transformers, numpy, an editable checkout of a library) is a
dependency: it is imported as before and listed as a requirement.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import logging
import re
import site
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import ModuleType

from transformers.dynamic_module_utils import get_imports, get_relative_imports

from .errors import RegistrationError

logger = logging.getLogger(__name__)

# Packages whose classes are never shipped as model code: the loading side installs them.
_NEVER_SHIPPED = frozenset({"torch", "transformers", "hf_lifecycle"})
_WINDOWS_ABSOLUTE = re.compile(r"^[A-Za-z]:[\\/]")


@dataclass(frozen=True)
class SourceFile:
    """One user module as shipped: ``name`` is the flat module name, the file is ``name.py``."""

    name: str
    module: str
    path: Path
    text: str


def flat_name(module_name: str) -> str:
    return module_name.rpartition(".")[2]


def check_class_importable(cls: type, role: str) -> ModuleType:
    """Return the module that defines ``cls``, or raise if the loader could not import it by name.

    ``role`` names the class in messages ("model class", "config class").
    """
    name = cls.__qualname__
    if cls.__module__ == "__main__":
        raise RegistrationError(
            f"The {role} {name} is defined in __main__ (a script, notebook cell or interactive "
            "session), so its source cannot be shipped. Move the class into a .py module and "
            "import it from there."
        )
    module = sys.modules.get(cls.__module__)
    if module is None or getattr(module, "__file__", None) is None:
        raise RegistrationError(
            f"Cannot find the source file of the {role} {name}: module {cls.__module__!r} has no "
            "file (it was created with exec or built in memory). Move the class into a .py module "
            "and import it from there."
        )
    if "<locals>" in cls.__qualname__ or cls.__qualname__ != cls.__name__:
        raise RegistrationError(
            f"The {role} {name} is not defined at the top level of {cls.__module__}, so the loader "
            "cannot import it by name. Define it at module level."
        )
    if getattr(module, cls.__name__, None) is not cls:
        raise RegistrationError(
            f"{cls.__module__}.{cls.__name__} is not the {role} passed in (the module was reloaded "
            "or the name rebound). Register an instance of the class the module defines now."
        )
    top = cls.__module__.partition(".")[0]
    if top in _NEVER_SHIPPED or top in sys.stdlib_module_names:
        raise RegistrationError(
            f"The {role} {name} comes from the {top!r} package, not from your code. Registration "
            "ships custom code: subclass it in your own .py module (a PreTrainedModel with its own "
            "PretrainedConfig, or a plain torch.nn.Module)."
        )
    return module


class _ModuleClassifier:
    """Decides which imported modules are user code to ship and which are dependencies."""

    def __init__(self, own_packages: set[str]) -> None:
        self.own_packages = own_packages
        self.distributions = importlib.metadata.packages_distributions()
        paths = sysconfig.get_paths()
        keys = ("stdlib", "platstdlib", "purelib", "platlib")
        roots = {paths[key] for key in keys if key in paths}
        roots.update(site.getsitepackages())
        user_site = site.getusersitepackages()
        if isinstance(user_site, str):
            roots.add(user_site)
        self.installed_roots = tuple(Path(root).resolve() for root in roots)

    def is_user_module(self, name: str) -> bool:
        top = name.partition(".")[0]
        if top in _NEVER_SHIPPED or top in sys.stdlib_module_names or top == "__future__":
            return False
        if top in self.own_packages:
            return True
        if top in self.distributions:
            return False
        origin = _module_origin(name)
        if origin is None:
            return False
        resolved = Path(origin).resolve()
        return not any(resolved.is_relative_to(root) for root in self.installed_roots)


def _module_origin(name: str) -> str | None:
    module = sys.modules.get(name)
    if module is not None:
        return getattr(module, "__file__", None)
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None and spec.has_location else None


def _is_submodule(package: str, name: str) -> bool:
    full_name = f"{package}.{name}"
    if full_name in sys.modules:
        return True
    parent = sys.modules.get(package)
    if parent is None or not hasattr(parent, "__path__"):
        return False
    try:
        return importlib.util.find_spec(full_name) is not None
    except (ImportError, ValueError):
        return False


def _package_of(module: ModuleType) -> str:
    if module.__package__ is not None:
        return module.__package__
    if hasattr(module, "__path__"):
        return module.__name__
    return module.__name__.rpartition(".")[0]


def _docstring_nodes(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def _looks_like_local_path(value: str) -> bool:
    if "\n" in value or len(value) > 1024:
        return False
    if value.startswith(("~/", "~\\")) or _WINDOWS_ABSOLUTE.match(value):
        return True
    return value.startswith("/") and len(PurePosixPath(value).parts) >= 3


def check_portable(tree: ast.Module, path: Path) -> None:
    """Raise if a shipped source edits ``sys.path`` or names an absolute path on this machine."""
    sys_names = {"sys"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "sys" and alias.asname:
                    sys_names.add(alias.asname)
    docstrings = _docstring_nodes(tree)
    for node in ast.walk(tree):
        line = getattr(node, "lineno", "?")
        edits_path = (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and (
                (node.value.id in sys_names and node.attr == "path")
                or (node.value.id == "site" and node.attr == "addsitedir")
            )
        ) or (
            isinstance(node, ast.ImportFrom)
            and node.module in ("sys", "site")
            and any(alias.name in ("path", "addsitedir") for alias in node.names)
        )
        if edits_path:
            raise RegistrationError(
                f"{path}:{line} changes the import path (sys.path or site.addsitedir), which only "
                "works on this machine. Import your modules with plain or relative imports instead."
            )
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
            and _looks_like_local_path(node.value)
        ):
            raise RegistrationError(
                f"{path}:{line} contains the absolute path {node.value!r}, which exists only on "
                "this machine. Pass such values through the config, or load files relative to the "
                "model folder."
            )


def _byte_offsets(data: bytes) -> list[int]:
    starts = [0]
    for index, byte in enumerate(data):
        if byte == 0x0A:
            starts.append(index + 1)
    return starts


def _format_alias(alias: ast.alias) -> str:
    return alias.name if alias.asname is None else f"{alias.name} as {alias.asname}"


def _rewrite_imports(
    text: str, tree: ast.Module, module: ModuleType, path: Path, classifier: _ModuleClassifier
) -> tuple[str, list[str]]:
    """Rewrite imports of user modules to ``from .<flat name> import ...``.

    Returns the new text and the dotted names of the user modules imported.
    """
    package = _package_of(module)
    edits: list[tuple[ast.stmt, str]] = []
    imported: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if classifier.is_user_module(alias.name):
                    parent, _, last = alias.name.rpartition(".")
                    hint = f"from {parent} import {last}" if parent else f"import {alias.name}"
                    raise RegistrationError(
                        f"{path}:{node.lineno} imports the module object {alias.name!r} "
                        f"(`import {alias.name}`), which transformers' remote-code loader cannot "
                        f"ship. Import the names you use instead, e.g. `from {alias.name} import "
                        f"SomeClass` rather than `{hint}`."
                    )
            continue
        if not isinstance(node, ast.ImportFrom) or node.module == "__future__":
            continue
        relative = "." * node.level + (node.module or "")
        try:
            base = importlib.util.resolve_name(relative, package) if node.level else relative
        except ImportError as err:
            raise RegistrationError(
                f"{path}:{node.lineno}: failed to resolve the relative import {relative!r} from "
                f"package {package!r}: {err}"
            ) from err
        if not classifier.is_user_module(base):
            continue
        for alias in node.names:
            if alias.name != "*" and _is_submodule(base, alias.name):
                raise RegistrationError(
                    f"{path}:{node.lineno} imports the module {base}.{alias.name} as an object "
                    f"(`from {relative} import {alias.name}`), which transformers' remote-code "
                    f"loader cannot ship. Import the names you use: `from {relative}."
                    f"{alias.name} import SomeClass`."
                )
        names = ", ".join(_format_alias(alias) for alias in node.names)
        edits.append((node, f"from .{flat_name(base)} import {names}"))
        imported.append(base)

    data = text.encode("utf-8")
    starts = _byte_offsets(data)
    # Edits run from the end so earlier offsets stay valid. ast offsets count UTF-8 bytes.
    edits.sort(key=lambda edit: (edit[0].lineno, edit[0].col_offset), reverse=True)
    for node, replacement in edits:
        begin = starts[node.lineno - 1] + node.col_offset
        end = starts[node.end_lineno - 1] + node.end_col_offset
        data = data[:begin] + replacement.encode("utf-8") + data[end:]
    return data.decode("utf-8"), imported


def _read_source(module: ModuleType) -> tuple[Path, str]:
    file = getattr(module, "__file__", None)
    if file is None or not file.endswith(".py") or not Path(file).is_file():
        raise RegistrationError(
            f"Module {module.__name__!r} has no Python source file to ship (file: {file!r}). "
            "Custom model code must live in .py files."
        )
    path = Path(file)
    text = path.read_text(encoding="utf-8")
    # ast counts \r\n and a lone \r as line ends too: normalize them before editing by offset.
    return path, text.replace("\r\n", "\n").replace("\r", "\n")


def collect_sources(root_modules: list[ModuleType], reserved: set[str]) -> dict[str, SourceFile]:
    """Gather the modules defining the model and config classes and every user module they import.

    ``reserved`` contains the flat names taken by generated files. Returns the rewritten sources
    keyed by flat module name. Raises :class:`RegistrationError` for a name clash between two
    modules, an import form the loader cannot follow, or a source that only works on this machine.
    """
    own_packages = {module.__name__.partition(".")[0] for module in root_modules}
    classifier = _ModuleClassifier(own_packages)
    sources: dict[str, SourceFile] = {}
    pending = [module.__name__ for module in root_modules]
    seen: set[str] = set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        module = sys.modules.get(name)
        if module is None:
            raise RegistrationError(f"Module {name!r} is imported by model code but not loaded.")
        path, text = _read_source(module)
        try:
            tree = ast.parse(text, filename=str(path))
        except SyntaxError as err:
            raise RegistrationError(f"Cannot parse {path}: {err}") from err
        check_portable(tree, path)
        rewritten, imported = _rewrite_imports(text, tree, module, path, classifier)
        short = flat_name(name)
        if short in reserved:
            raise RegistrationError(
                f"Module {name} would be shipped as {short}.py, a name the generated code uses. "
                "Rename the module."
            )
        if short in sources:
            raise RegistrationError(
                f"Modules {sources[short].module} and {name} would both be shipped as {short}.py: "
                "transformers loads custom code from one flat folder. Rename one of them."
            )
        sources[short] = SourceFile(name=short, module=name, path=path, text=rewritten)
        logger.debug("Shipping %s as %s.py", path, short)
        pending.extend(imported)
    return sources


def verify_loadable(files: dict[str, str]) -> list[str]:
    """Check the files as transformers' loader will read them, and return their requirements.

    ``files`` maps flat module names to source text. Every relative import the loader finds must
    name a shipped file. The result lists the top-level packages the files import that are not
    in the standard library, which is what the loader requires to be installed.
    """
    requirements: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="hf-lifecycle-sources-") as folder:
        for name, text in files.items():
            path = Path(folder, f"{name}.py")
            path.write_text(text, encoding="utf-8")
            missing = sorted(set(get_relative_imports(path)) - set(files))
            if missing:
                raise RegistrationError(
                    f"{name}.py would make transformers' loader look for {missing}, which are not "
                    "shipped modules. Check that each import of your own modules sits on its own "
                    "line and that no docstring line starts with 'from .'."
                )
            requirements.update(get_imports(path))
    return sorted(name for name in requirements if name not in sys.stdlib_module_names)
