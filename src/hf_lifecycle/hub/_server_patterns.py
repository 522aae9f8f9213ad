"""Git-style path patterns for the local Hub: ``.gitattributes`` LFS rules and ``.gitignore``.

Both files use the pattern syntax of gitignore(5). ``*`` and ``?`` stop at ``/``, and ``**``
crosses folders. A pattern without a ``/`` matches the file name at any depth, a leading ``/``
anchors a pattern to the repository root, and a trailing ``/`` matches folders only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Files of this size or more are stored with LFS, as on the Hugging Face Hub.
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024

# The `.gitattributes` of a new repository: the binary formats that the Hub stores with LFS.
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib",
        "*.lfs.*", "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot",
        "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors",
        "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip",
        "*.zst", "*tfevents*",
    )
)  # fmt: skip


@dataclass(frozen=True)
class _Rule:
    regex: re.Pattern[str]
    negated: bool
    folders_only: bool


def _translate(pattern: str) -> str:
    """Translate one glob (without leading or trailing ``/``) into a regular expression body."""
    out: list[str] = []
    i = 0
    n = len(pattern)
    while i < n:
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("/**", i) and i + 3 == n:
            out.append("/.*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.find("]", i + 2)
            if end == -1:
                out.append(re.escape("["))
                i += 1
                continue
            body = pattern[i + 1 : end].replace("\\", "\\\\")
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append(f"[{body}]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


def _compile(pattern: str, negated: bool) -> _Rule | None:
    folders_only = pattern.endswith("/")
    pattern = pattern.rstrip("/")
    if not pattern:
        return None
    # A slash anywhere but at the end anchors the pattern to the root.
    anchored = "/" in pattern
    pattern = pattern.lstrip("/")
    body = _translate(pattern)
    prefix = "^" if anchored else "^(?:.*/)?"
    return _Rule(re.compile(prefix + body + "$"), negated, folders_only)


def _parents(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


class GitIgnore:
    """The rules of one ``.gitignore`` file, applied to paths relative to the repository root."""

    def __init__(self, text: str) -> None:
        self._rules: list[_Rule] = []
        for line in text.splitlines():
            line = line.rstrip()
            if not line or line.startswith("#"):
                continue
            negated = line.startswith("!")
            rule = _compile(line[1:] if negated else line, negated)
            if rule is not None:
                self._rules.append(rule)

    def _matches(self, path: str, *, is_folder: bool) -> bool:
        ignored = False
        for rule in self._rules:
            if rule.folders_only and not is_folder:
                continue
            if rule.regex.match(path):
                ignored = not rule.negated
        return ignored

    def ignores(self, path: str) -> bool:
        """Return whether ``path`` (a file) is ignored, directly or through a parent folder."""
        if any(self._matches(folder, is_folder=True) for folder in _parents(path)):
            return True
        return self._matches(path, is_folder=False)


class GitAttributes:
    """The ``filter=lfs`` rules of a ``.gitattributes`` file. Later lines override earlier ones."""

    def __init__(self, text: str) -> None:
        self._rules: list[tuple[re.Pattern[str], bool]] = []
        for line in text.splitlines():
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            lfs: bool | None = None
            for attribute in fields[1:]:
                if attribute == "filter=lfs":
                    lfs = True
                elif attribute.startswith(("filter=", "-filter", "!filter")):
                    lfs = False
            rule = _compile(fields[0], negated=False)
            if lfs is not None and rule is not None and not rule.folders_only:
                self._rules.append((rule.regex, lfs))

    def is_lfs(self, path: str) -> bool:
        lfs = False
        for regex, value in self._rules:
            if regex.match(path):
                lfs = value
        return lfs


def upload_mode(path: str, size: int, sample: bytes, attributes: GitAttributes | None) -> str:
    """Return ``"lfs"`` or ``"regular"`` for a file about to be committed, by the Hub's rules.

    A file goes to LFS when it is at least 10 MiB, when its first 512 bytes contain a NUL byte
    (git's test for binary content), or when ``.gitattributes`` marks its path ``filter=lfs``.
    """
    if size >= LFS_SIZE_THRESHOLD or b"\x00" in sample[:512]:
        return "lfs"
    if attributes is not None and attributes.is_lfs(path):
        return "lfs"
    return "regular"
