"""Retention policies: pure objects that decide which committed checkpoints to keep.

A policy takes the committed checkpoints and returns the names to keep. It does no I/O, so the
same policy can be tested with tables of :class:`CheckpointInfo` records and reused by a CLI
that only lists checkpoints. Policies compose with ``|``: a checkpoint survives when any of the
combined policies keeps it.

:func:`plan_retention` turns a policy into a list of names to keep and a list to delete, and
adds two invariants that hold whatever the policy returns: the newest checkpoint (highest
``sequence``) is kept, and so is every ``protected`` name. Order always comes from
``sequence``, never from names, steps or timestamps, because step counters can restart each
epoch and names do not sort numerically ("checkpoint-step-10" < "checkpoint-step-9").
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import logging
import math
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, Union

from hf_lifecycle.checkpoint.info import CheckpointInfo
from hf_lifecycle.errors import ConfigurationError

__all__ = [
    "AnyOf",
    "CallablePolicy",
    "KeepAll",
    "KeepBestM",
    "KeepEveryNSteps",
    "KeepLastN",
    "NEWEST_REASON",
    "PROTECTED_REASON",
    "PolicyLike",
    "RetentionPlan",
    "RetentionPolicy",
    "as_policy",
    "explain",
    "plan_retention",
]

logger = logging.getLogger(__name__)

# ids of KeepBestM objects that already reported a missing metric at WARNING.
_WARNED_POLICIES: set[int] = set()

NEWEST_REASON = "newest"
"""Reason that :func:`explain` lists for the newest checkpoint, which is never deleted."""

PROTECTED_REASON = "protected"
"""Reason that :func:`explain` lists for a name passed in ``protected``."""


class RetentionPolicy(abc.ABC):
    """Base class of retention policies.

    Subclasses implement :meth:`select`, which receives the committed checkpoints. The built-in
    policies sort them by ``sequence`` themselves, so callers may pass them in any order.
    """

    @abc.abstractmethod
    def select(self, checkpoints: Sequence[CheckpointInfo]) -> set[str]:
        """Return the names of the checkpoints this policy keeps."""

    def __call__(self, checkpoints: Sequence[CheckpointInfo]) -> set[str]:
        return self.select(checkpoints)

    def __or__(self, other: RetentionPolicy | PolicyFunction) -> RetentionPolicy:
        if not callable(other):
            return NotImplemented
        return AnyOf((self, as_policy(other)))

    def __ror__(self, other: PolicyFunction) -> RetentionPolicy:
        if not callable(other):
            return NotImplemented
        return AnyOf((as_policy(other), self))

    def describe(self) -> str:
        """Return a short human-readable text such as ``"last 3"``, for tables and logs."""
        return repr(self)


PolicyFunction = Callable[[list[CheckpointInfo]], Iterable[str]]
PolicyLike = Union[RetentionPolicy, PolicyFunction, None]


@dataclasses.dataclass(frozen=True)
class KeepLastN(RetentionPolicy):
    """Keep the ``n`` most recently committed checkpoints."""

    n: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "n", _positive_int("KeepLastN", "n", self.n))

    def select(self, checkpoints: Sequence[CheckpointInfo]) -> set[str]:
        ordered = _in_commit_order(checkpoints)
        return {checkpoint.name for checkpoint in ordered[-self.n :]}

    def describe(self) -> str:
        return f"last {self.n}"


@dataclasses.dataclass(frozen=True)
class KeepBestM(RetentionPolicy):
    """Keep the ``m`` checkpoints with the best value of ``metric``.

    ``mode="min"`` ranks lower values first (losses), ``mode="max"`` higher values first
    (accuracy). Equal values rank the newer checkpoint first.

    Checkpoints are treated by the value they logged for ``metric``:

    - missing, or not a number (a string, a bool, an object ``float()`` rejects): kept, and
      never counted among the ``m`` best, because the policy cannot rank them.
    - NaN, ``inf`` or ``-inf``: never counted as best and not kept by this policy, because
      such a value usually means the run diverged. :func:`plan_retention` still keeps the newest
      checkpoint whatever its value.

    When no checkpoint logged ``metric`` at all, the name is most likely misspelled, so the
    policy logs a warning that lists the metric names present and keeps every checkpoint.
    """

    m: int = 2
    metric: str = "loss"
    mode: Literal["min", "max"] = "min"

    def __post_init__(self) -> None:
        object.__setattr__(self, "m", _positive_int("KeepBestM", "m", self.m))
        if not isinstance(self.metric, str) or not self.metric.strip():
            raise ConfigurationError(
                f"Invalid KeepBestM.metric {self.metric!r}: expected a non-empty metric name. "
                f"Pass the name logged with each save, for example metric='val_loss'."
            )
        if self.mode not in ("min", "max"):
            raise ConfigurationError(
                f"Invalid KeepBestM.mode {self.mode!r}: expected 'min' or 'max'. Use "
                f"mode='min' for losses and mode='max' for metrics such as accuracy."
            )

    def select(self, checkpoints: Sequence[CheckpointInfo]) -> set[str]:
        ordered = _in_commit_order(checkpoints)
        if not ordered:
            return set()
        if not any(self.metric in checkpoint.metrics for checkpoint in ordered):
            present = sorted({name for checkpoint in ordered for name in checkpoint.metrics})
            # Retention runs after every save: each policy object warns once, then at DEBUG.
            level = logging.DEBUG if id(self) in _WARNED_POLICIES else logging.WARNING
            _WARNED_POLICIES.add(id(self))
            logger.log(
                level,
                "Metric %r is not logged by any of the %d checkpoints (metrics present: %s), "
                "so KeepBestM keeps all of them. Pass one of the present names as metric=, "
                "or log %r with each save.",
                self.metric,
                len(ordered),
                ", ".join(present) if present else "none",
                self.metric,
            )
            return {checkpoint.name for checkpoint in ordered}

        unscored: set[str] = set()
        scored: list[tuple[float, int, str]] = []
        for checkpoint in ordered:
            value = _metric_value(checkpoint, self.metric)
            if value is None:
                unscored.add(checkpoint.name)
            elif math.isfinite(value):
                score = value if self.mode == "min" else -value
                # A larger sequence sorts first among equal scores, so ties go to the newer one.
                scored.append((score, -checkpoint.sequence, checkpoint.name))
        scored.sort()
        return unscored | {name for _, _, name in scored[: self.m]}

    def describe(self) -> str:
        return f"best {self.m} by {self.metric} ({self.mode})"


@dataclasses.dataclass(frozen=True)
class KeepEveryNSteps(RetentionPolicy):
    """Keep the checkpoints whose step is a multiple of ``k``, to thin a long run.

    Checkpoints without a step (for example epoch-only saves) are kept, because there is no
    step to thin them by.
    """

    k: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "k", _positive_int("KeepEveryNSteps", "k", self.k))

    def select(self, checkpoints: Sequence[CheckpointInfo]) -> set[str]:
        return {
            checkpoint.name
            for checkpoint in checkpoints
            if checkpoint.step is None or checkpoint.step % self.k == 0
        }

    def describe(self) -> str:
        return f"every {self.k} steps"


@dataclasses.dataclass(frozen=True)
class KeepAll(RetentionPolicy):
    """Keep every checkpoint, so nothing is ever deleted."""

    def select(self, checkpoints: Sequence[CheckpointInfo]) -> set[str]:
        return {checkpoint.name for checkpoint in checkpoints}

    def describe(self) -> str:
        return "all"


@dataclasses.dataclass(frozen=True)
class CallablePolicy(RetentionPolicy):
    """A policy backed by a function that takes the checkpoints and returns the names to keep.

    The function receives a new list of :class:`CheckpointInfo` in commit order, oldest first.
    Names it returns that match no checkpoint are ignored and logged at DEBUG. An exception it
    raises propagates unchanged, with a note naming this policy. A result that is not an
    iterable of strings raises :class:`ConfigurationError`.
    """

    function: PolicyFunction

    def __post_init__(self) -> None:
        if not callable(self.function):
            raise ConfigurationError(
                f"Invalid CallablePolicy.function {self.function!r}: expected a callable. Pass "
                f"a function f(checkpoints) that returns the names of the checkpoints to keep."
            )

    def select(self, checkpoints: Sequence[CheckpointInfo]) -> set[str]:
        ordered = _in_commit_order(checkpoints)
        try:
            result = self.function(list(ordered))
        except Exception as err:
            # NOTE: add_note exists from Python 3.11, so on 3.10 the error propagates bare.
            if hasattr(err, "add_note"):
                err.add_note(
                    f"Raised by retention policy {self.describe()} while selecting among "
                    f"{len(ordered)} checkpoints."
                )
            raise
        names = self._check_result(result)
        known = {checkpoint.name for checkpoint in ordered}
        unknown = names - known
        if unknown:
            logger.debug(
                "Retention policy %s returned %d names that match no checkpoint, ignored: %s",
                self.describe(),
                len(unknown),
                ", ".join(sorted(unknown)),
            )
        return names & known

    def _check_result(self, result: object) -> set[str]:
        expected = "Return an iterable of checkpoint names, such as a set or a list of str."
        if isinstance(result, (str, bytes)) or not isinstance(result, Iterable):
            raise ConfigurationError(
                f"Retention policy {self.describe()} returned {result!r} of type "
                f"{type(result).__name__}, not an iterable of names. {expected}"
            )
        names = set()
        for item in result:
            if not isinstance(item, str):
                raise ConfigurationError(
                    f"Retention policy {self.describe()} returned the item {item!r} of type "
                    f"{type(item).__name__}, not a checkpoint name. {expected}"
                )
            names.add(item)
        return names

    def describe(self) -> str:
        name = getattr(self.function, "__qualname__", None) or repr(self.function)
        return f"callable {name}"


@dataclasses.dataclass(frozen=True)
class AnyOf(RetentionPolicy):
    """Keep a checkpoint when any of ``policies`` keeps it.

    ``policies`` may mix policies and plain callables; callables are wrapped in
    :class:`CallablePolicy`, and nested ``AnyOf`` are flattened, so ``a | b | c`` has three
    leaves.
    """

    policies: tuple[RetentionPolicy, ...]

    def __post_init__(self) -> None:
        candidates = self.policies
        if isinstance(candidates, (RetentionPolicy, str, bytes)) or not isinstance(
            candidates, Iterable
        ):
            raise ConfigurationError(
                f"Invalid AnyOf.policies {candidates!r}: expected a list of policies. "
                f"Pass for example AnyOf([KeepLastN(1), KeepBestM(1)]) or write "
                f"KeepLastN(1) | KeepBestM(1)."
            )
        leaves: list[RetentionPolicy] = []
        for candidate in candidates:
            if candidate is None:
                raise ConfigurationError(
                    "Invalid AnyOf policy None: every member must be a policy or a callable. "
                    "Pass KeepLastN(3) explicitly if that is the intended default."
                )
            policy = as_policy(candidate)
            leaves.extend(policy.policies if isinstance(policy, AnyOf) else (policy,))
        if not leaves:
            raise ConfigurationError(
                "Invalid AnyOf.policies: the list is empty, so every checkpoint but the newest "
                "would be deleted. Pass at least one policy, or KeepAll() to delete nothing."
            )
        object.__setattr__(self, "policies", tuple(leaves))

    def select(self, checkpoints: Sequence[CheckpointInfo]) -> set[str]:
        kept: set[str] = set()
        for policy in self.policies:
            kept |= policy.select(checkpoints)
        return kept

    def describe(self) -> str:
        return " or ".join(policy.describe() for policy in self.policies)


@dataclasses.dataclass(frozen=True)
class RetentionPlan:
    """Names to keep and names to delete, each in commit order, oldest first."""

    keep: list[str]
    delete: list[str]


def as_policy(policy: PolicyLike) -> RetentionPolicy:
    """Convert a policy, a callable or ``None`` to a :class:`RetentionPolicy`.

    ``None`` becomes ``KeepLastN(3)``. A callable that takes the list of checkpoints and returns
    the names to keep is wrapped in :class:`CallablePolicy`.
    """
    if policy is None:
        return KeepLastN(3)
    if isinstance(policy, RetentionPolicy):
        return policy
    if isinstance(policy, type) and issubclass(policy, RetentionPolicy):
        raise ConfigurationError(
            f"Invalid retention policy: got the class {policy.__name__}, not an instance. "
            f"Pass {policy.__name__}(...) with its arguments, for example KeepLastN(3)."
        )
    if callable(policy):
        return CallablePolicy(policy)
    raise ConfigurationError(
        f"Invalid retention policy {policy!r} of type {type(policy).__name__}. Pass a "
        f"RetentionPolicy such as KeepLastN(3), a callable that takes the list of checkpoints "
        f"and returns the names to keep, or None for KeepLastN(3)."
    )


def plan_retention(
    policy: PolicyLike,
    checkpoints: Iterable[CheckpointInfo],
    *,
    protected: Iterable[str] = (),
) -> RetentionPlan:
    """Decide which checkpoints to keep and which to delete.

    The plan keeps what ``policy`` selects, plus the newest checkpoint (highest ``sequence``)
    and every name in ``protected``, whatever the policy returns. Protected names that match no
    checkpoint are ignored. Raises :class:`ConfigurationError` when two checkpoints share a name
    or a sequence, because then "newest" and "delete this name" are ambiguous.
    """
    resolved = as_policy(policy)
    ordered = _validated_commit_order(checkpoints)
    protected_names = _protected_names(protected)
    if not ordered:
        return RetentionPlan(keep=[], delete=[])

    kept = set(resolved.select(ordered))
    kept.add(ordered[-1].name)
    kept |= protected_names
    keep = [checkpoint.name for checkpoint in ordered if checkpoint.name in kept]
    delete = [checkpoint.name for checkpoint in ordered if checkpoint.name not in kept]
    return RetentionPlan(keep=keep, delete=delete)


def explain(
    policy: PolicyLike,
    checkpoints: Iterable[CheckpointInfo],
    *,
    protected: Iterable[str] = (),
) -> dict[str, list[str]]:
    """Map each name that :func:`plan_retention` keeps to the reasons it is kept.

    The reasons are the :meth:`~RetentionPolicy.describe` texts of the leaf policies that keep
    the checkpoint, in the order the policies were combined, followed by :data:`NEWEST_REASON`
    for the newest checkpoint and :data:`PROTECTED_REASON` for a protected one. Keys follow
    commit order, and checkpoints the plan deletes are absent.
    """
    resolved = as_policy(policy)
    ordered = _validated_commit_order(checkpoints)
    protected_names = _protected_names(protected)
    if not ordered:
        return {}

    leaves = resolved.policies if isinstance(resolved, AnyOf) else (resolved,)
    reasons: dict[str, list[str]] = {checkpoint.name: [] for checkpoint in ordered}
    for leaf in leaves:
        description = leaf.describe()
        for name in leaf.select(ordered):
            if name in reasons:
                reasons[name].append(description)
    reasons[ordered[-1].name].append(NEWEST_REASON)
    for name in protected_names:
        if name in reasons:
            reasons[name].append(PROTECTED_REASON)
    return {name: kept_by for name, kept_by in reasons.items() if kept_by}


def _in_commit_order(checkpoints: Iterable[CheckpointInfo]) -> list[CheckpointInfo]:
    return sorted(checkpoints, key=operator.attrgetter("sequence"))


def _validated_commit_order(checkpoints: Iterable[CheckpointInfo]) -> list[CheckpointInfo]:
    ordered = _in_commit_order(checkpoints)
    names = [checkpoint.name for checkpoint in ordered]
    sequences = [checkpoint.sequence for checkpoint in ordered]
    duplicate_names = sorted(
        name for name, count in collections.Counter(names).items() if count > 1
    )
    if duplicate_names:
        raise ConfigurationError(
            f"Invalid checkpoint list: the names {duplicate_names} occur more than once. Pass "
            f"each committed checkpoint once, as listed by the checkpoint store."
        )
    duplicate_sequences = sorted(
        value for value, count in collections.Counter(sequences).items() if count > 1
    )
    if duplicate_sequences:
        raise ConfigurationError(
            f"Invalid checkpoint list: the sequence numbers {duplicate_sequences} occur more "
            f"than once, so the newest checkpoint is ambiguous. Give each commit its own "
            f"sequence number."
        )
    return ordered


def _protected_names(protected: Iterable[str]) -> set[str]:
    if isinstance(protected, (str, bytes)) or not isinstance(protected, Iterable):
        raise ConfigurationError(
            f"Invalid protected {protected!r}: expected an iterable of checkpoint names. "
            f"Wrap a single name in a list, for example protected=['checkpoint-step-100']."
        )
    names = list(protected)
    invalid = [name for name in names if not isinstance(name, str)]
    if invalid:
        raise ConfigurationError(
            f"Invalid protected names {invalid!r}: expected checkpoint names of type str."
        )
    return set(names)


def _positive_int(owner: str, field: str, value: Any) -> int:
    if not isinstance(value, bool):
        try:
            number = operator.index(value)
        except TypeError:
            pass
        else:
            if number >= 1:
                return number
    raise ConfigurationError(
        f"Invalid {owner}.{field} {value!r}: expected a whole number >= 1. "
        f"Pass for example {owner}({field}=3)."
    )


def _metric_value(checkpoint: CheckpointInfo, metric: str) -> float | None:
    """Return the checkpoint's value for ``metric`` as a float, or None when it has no number."""
    if metric not in checkpoint.metrics:
        return None
    value = checkpoint.metrics[metric]
    if isinstance(value, (bool, str, bytes)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
