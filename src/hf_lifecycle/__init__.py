"""hf_lifecycle: crash-safe checkpoints, retention, tracking and Hub sync for PyTorch training.

The front door is :class:`HFManager`; retention policies such as :class:`KeepLastN`
and :class:`KeepBestM` decide which checkpoints it keeps.
"""

from hf_lifecycle._version import __version__
from hf_lifecycle.checkpoint.info import CheckpointInfo
from hf_lifecycle.errors import (
    CheckpointCorruptedError,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointSaveError,
    ConfigurationError,
    DistributedError,
    HFLifecycleError,
    HubAuthenticationError,
    HubError,
    InvalidCheckpointNameError,
    PushError,
    RegistrationError,
    RepoIdRequiredError,
    SerializationError,
)
from hf_lifecycle.final_model import load_model_weights
from hf_lifecycle.manager import HFManager
from hf_lifecycle.retention import (
    AnyOf,
    KeepAll,
    KeepBestM,
    KeepEveryNSteps,
    KeepLastN,
    RetentionPlan,
    RetentionPolicy,
    plan_retention,
)

__all__ = [
    "AnyOf",
    "CheckpointCorruptedError",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointNotFoundError",
    "CheckpointSaveError",
    "ConfigurationError",
    "DistributedError",
    "HFLifecycleError",
    "HFManager",
    "HubAuthenticationError",
    "HubError",
    "InvalidCheckpointNameError",
    "KeepAll",
    "KeepBestM",
    "KeepEveryNSteps",
    "KeepLastN",
    "PushError",
    "RegistrationError",
    "RepoIdRequiredError",
    "RetentionPlan",
    "RetentionPolicy",
    "SerializationError",
    "__version__",
    "load_model_weights",
    "plan_retention",
]
