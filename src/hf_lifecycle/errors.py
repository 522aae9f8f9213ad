"""Exceptions raised by hf_lifecycle.

Every exception derives from :class:`HFLifecycleError`, and each leaf also
derives from the built-in exception it refines, so callers can catch either::

    HFLifecycleError
    ├── ConfigurationError (ValueError)
    │   └── InvalidCheckpointNameError
    ├── SerializationError (TypeError)
    ├── CheckpointError
    │   ├── CheckpointNotFoundError (FileNotFoundError)
    │   ├── CheckpointCorruptedError (ValueError)
    │   └── CheckpointSaveError (OSError)
    ├── HubError
    │   ├── RepoIdRequiredError (ValueError)
    │   ├── HubAuthenticationError (PermissionError)
    │   └── PushError (RuntimeError)
    ├── RegistrationError (ValueError)
    └── DistributedError (RuntimeError)
"""

from __future__ import annotations

from collections.abc import Sequence


class HFLifecycleError(Exception):
    """Root of every exception raised by hf_lifecycle."""


class ConfigurationError(HFLifecycleError, ValueError):
    """An argument or setting is invalid. The message names the value and the fix."""


class InvalidCheckpointNameError(ConfigurationError):
    """A checkpoint name is empty, contains a path separator, or escapes the checkpoint folder."""

    def __init__(self, name: object, reason: str) -> None:
        self.name = name
        super().__init__(
            f"Invalid checkpoint name {name!r}: {reason}. Use a plain folder name such as "
            f"'checkpoint-step-100' (letters, digits, '-', '_' and '.')."
        )


class SerializationError(HFLifecycleError, TypeError):
    """A value cannot be stored as JSON or as a tensor. ``key`` is the dotted path of the value."""

    def __init__(self, message: str, key: str | None = None) -> None:
        self.key = key
        super().__init__(message)


class CheckpointError(HFLifecycleError):
    """Base class for errors about one checkpoint. ``path`` is the checkpoint folder when known."""

    def __init__(self, message: str, path: str | None = None) -> None:
        self.path = path
        super().__init__(message)


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No committed checkpoint has the requested name."""


class CheckpointCorruptedError(CheckpointError, ValueError):
    """A checkpoint file is missing, truncated, or does not match its checksum.

    ``file`` is the path of the bad file.
    """

    def __init__(self, message: str, path: str | None = None, file: str | None = None) -> None:
        self.file = file
        super().__init__(message, path)


class CheckpointSaveError(CheckpointError, OSError):
    """Writing a checkpoint failed. Nothing was committed and no older checkpoint was removed."""


class HubError(HFLifecycleError):
    """Base class for errors talking to the Hugging Face Hub."""

    def __init__(self, message: str, repo_id: str | None = None) -> None:
        self.repo_id = repo_id
        super().__init__(message)


class RepoIdRequiredError(HubError, ValueError):
    """A Hub operation was requested on a manager created without ``repo_id``."""


class HubAuthenticationError(HubError, PermissionError):
    """No token was found, or the Hub rejected it."""


class PushError(HubError, RuntimeError):
    """One or more pushes to the Hub failed after retries.

    ``checkpoints`` lists the names of the checkpoints whose push failed.
    """

    def __init__(
        self, message: str, repo_id: str | None = None, checkpoints: Sequence[str] = ()
    ) -> None:
        self.checkpoints = list(checkpoints)
        super().__init__(message, repo_id)


class RegistrationError(HFLifecycleError, ValueError):
    """A custom model cannot be registered with the transformers Auto classes."""


class DistributedError(HFLifecycleError, RuntimeError):
    """A collective operation failed on one or more ranks. ``ranks`` lists the failing ranks."""

    def __init__(self, message: str, ranks: Sequence[int] = ()) -> None:
        self.ranks = list(ranks)
        super().__init__(message)
