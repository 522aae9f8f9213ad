"""Retention policies, checked against tables of checkpoints and simulated training runs."""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from collections.abc import Iterable, Sequence
from typing import Any

import pytest

from hf_lifecycle import retention
from hf_lifecycle.checkpoint.info import CheckpointInfo
from hf_lifecycle.errors import ConfigurationError
from hf_lifecycle.retention import (
    NEWEST_REASON,
    PROTECTED_REASON,
    AnyOf,
    CallablePolicy,
    KeepAll,
    KeepBestM,
    KeepEveryNSteps,
    KeepLastN,
    RetentionPlan,
    RetentionPolicy,
    as_policy,
    explain,
    plan_retention,
)


def make_checkpoint(
    sequence: int,
    *,
    step: int | None = None,
    epoch: int | None = None,
    metrics: dict[str, Any] | None = None,
    name: str | None = None,
) -> CheckpointInfo:
    if name is None:
        name = f"checkpoint-step-{step}" if step is not None else f"checkpoint-{sequence}"
    return CheckpointInfo(
        name=name,
        path=f"/runs/demo/{name}",
        sequence=sequence,
        step=step,
        epoch=epoch,
        metrics=metrics or {},
        timestamp=1_700_000_000.0 + sequence,
    )


def steps_with_metric(values: Sequence[float], metric: str = "loss") -> list[CheckpointInfo]:
    """One checkpoint per value, at steps 1, 2, ... and in that commit order."""
    return [
        make_checkpoint(index, step=index, metrics={metric: value})
        for index, value in enumerate(values, start=1)
    ]


def simulate_saves(
    policy: Any,
    saves: Iterable[CheckpointInfo],
    *,
    protected: Iterable[str] = (),
) -> list[list[CheckpointInfo]]:
    """Commit each save in turn and apply retention to the survivors after every save.

    A save whose name is already committed replaces that checkpoint, as a store that writes
    to the same folder name does. Returns the survivors after each save, in commit order.
    """
    survivors: list[CheckpointInfo] = []
    history = []
    for save in saves:
        survivors = [checkpoint for checkpoint in survivors if checkpoint.name != save.name]
        survivors.append(save)
        plan = plan_retention(policy, survivors, protected=protected)
        assert set(plan.keep) | set(plan.delete) == {checkpoint.name for checkpoint in survivors}
        survivors = [checkpoint for checkpoint in survivors if checkpoint.name in plan.keep]
        history.append(list(survivors))
    return history


def steps_of(checkpoints: Iterable[CheckpointInfo]) -> list[int | None]:
    return [checkpoint.step for checkpoint in checkpoints]


# Simulated runs: retention after every save, final survivors by step.


@pytest.mark.parametrize(
    ("policy", "saves", "expected_steps"),
    [
        pytest.param(
            KeepLastN(3),
            [make_checkpoint(step, step=step) for step in range(1, 13)],
            [10, 11, 12],
            id="last-3-of-12",
        ),
        pytest.param(
            KeepLastN(1) | KeepBestM(1),
            steps_with_metric([0.1, 0.5, 0.6, 0.7]),
            [1, 4],
            id="last-1-or-best-1-loss",
        ),
        pytest.param(
            KeepBestM(2, metric="accuracy", mode="max"),
            steps_with_metric([0.5, 0.9, 0.7, 0.8, 0.6], metric="accuracy"),
            [2, 4, 5],
            id="best-2-max-plus-newest",
        ),
        pytest.param(
            KeepBestM(1),
            steps_with_metric([0.1, 0.2, 0.3, 0.4]),
            [1, 4],
            id="worsening-metric-keeps-newest",
        ),
        pytest.param(
            KeepEveryNSteps(5),
            [make_checkpoint(step, step=step) for step in range(1, 13)],
            [5, 10, 12],
            id="every-5-steps-plus-newest",
        ),
        pytest.param(
            KeepAll(),
            [make_checkpoint(step, step=step) for step in range(1, 6)],
            [1, 2, 3, 4, 5],
            id="keep-all",
        ),
        pytest.param(
            KeepEveryNSteps(4) | KeepLastN(2),
            [make_checkpoint(step, step=step * 2) for step in range(1, 9)],
            [4, 8, 12, 14, 16],
            id="every-4-or-last-2",
        ),
        pytest.param(
            None,
            [make_checkpoint(step, step=step) for step in range(1, 8)],
            [5, 6, 7],
            id="none-means-last-3",
        ),
    ],
)
def test_simulated_run_survivors(policy, saves, expected_steps):
    history = simulate_saves(policy, saves)

    assert steps_of(history[-1]) == expected_steps


def test_best_or_newest_after_every_save():
    values = [0.1, 0.5, 0.6, 0.7]
    policy = KeepLastN(1) | KeepBestM(1)

    history = simulate_saves(policy, steps_with_metric(values))

    for save_index, survivors in enumerate(history):
        seen = values[: save_index + 1]
        best_step = seen.index(min(seen)) + 1
        newest_step = save_index + 1
        assert set(steps_of(survivors)) == {best_step, newest_step}, f"after save {newest_step}"


def test_improving_metric_moves_best():
    history = simulate_saves(KeepLastN(1) | KeepBestM(1), steps_with_metric([0.5, 0.3, 0.4, 0.1]))

    assert [steps_of(survivors) for survivors in history] == [[1], [2], [2, 3], [4]]


def test_worsening_metric_never_evicts_newest():
    values = [0.1, 0.2, 0.3, 0.4, 0.5]

    history = simulate_saves(KeepBestM(1), steps_with_metric(values))

    for save_index, survivors in enumerate(history):
        assert survivors[-1].step == save_index + 1
        assert survivors[0].step == 1


# Epoch-only saves and step counters that restart: order comes from sequence only.


def test_epoch_only_saves_keep_latest_epochs():
    # Names sort as text ("checkpoint-epoch-10" < "checkpoint-epoch-9"), so a name-based
    # order would keep the wrong ones.
    saves = [
        make_checkpoint(epoch, epoch=epoch, name=f"checkpoint-epoch-{epoch}")
        for epoch in range(1, 13)
    ]

    history = simulate_saves(KeepLastN(2), saves)

    assert [checkpoint.epoch for checkpoint in history[-1]] == [11, 12]
    assert all(checkpoint.step is None for checkpoint in history[-1])


def test_epoch_only_saves_survive_step_thinning():
    saves = [make_checkpoint(epoch, epoch=epoch) for epoch in range(1, 5)]

    history = simulate_saves(KeepEveryNSteps(100), saves)

    assert [checkpoint.epoch for checkpoint in history[-1]] == [1, 2, 3, 4]


def test_restarting_step_with_recurring_names():
    # The step counter restarts every epoch, so the names checkpoint-step-9 and
    # checkpoint-step-10 are saved again in each epoch and replace the earlier folder.
    saves = []
    sequence = 0
    for epoch in (1, 2, 3):
        for step in (9, 10):
            sequence += 1
            saves.append(make_checkpoint(sequence, step=step, epoch=epoch))

    history = simulate_saves(KeepLastN(1), saves)

    survivors = [(c.name, c.epoch, c.sequence) for c in history[-1]]
    assert survivors == [("checkpoint-step-10", 3, 6)]
    # After epoch 2 saves checkpoint-step-9 again, it is newer than checkpoint-step-10 of
    # epoch 1 although its step is lower.
    assert [(c.name, c.epoch) for c in history[2]] == [("checkpoint-step-9", 2)]


def test_restarting_step_with_unique_names():
    checkpoints = []
    sequence = 0
    for epoch in (1, 2, 3):
        for step in (5, 9, 10):
            sequence += 1
            name = f"epoch-{epoch}-checkpoint-step-{step}"
            checkpoints.append(make_checkpoint(sequence, step=step, epoch=epoch, name=name))
    shuffled = list(checkpoints)
    random.Random(0).shuffle(shuffled)

    plan = plan_retention(KeepLastN(4), shuffled)

    assert plan.keep == [
        "epoch-2-checkpoint-step-10",
        "epoch-3-checkpoint-step-5",
        "epoch-3-checkpoint-step-9",
        "epoch-3-checkpoint-step-10",
    ]
    assert plan.delete == [checkpoint.name for checkpoint in checkpoints[:5]]


def test_order_ignores_timestamps_and_steps():
    # Timestamps and steps run backwards here, so only sequence identifies the newest.
    checkpoints = [
        dataclasses.replace(
            make_checkpoint(sequence, step=100 - sequence), timestamp=2_000_000_000.0 - sequence
        )
        for sequence in range(1, 6)
    ]

    plan = plan_retention(KeepLastN(2), reversed(checkpoints))

    assert plan.keep == ["checkpoint-step-96", "checkpoint-step-95"]


# KeepBestM: missing and non-finite values, ties, unknown metric names.


@pytest.mark.parametrize(
    ("policy", "metrics", "expected_kept"),
    [
        pytest.param(KeepBestM(1), [0.3, 0.1, 0.2], {2}, id="min"),
        pytest.param(KeepBestM(1, mode="max"), [0.3, 0.1, 0.2], {1}, id="max"),
        pytest.param(KeepBestM(2), [0.3, 0.1, 0.2], {2, 3}, id="min-two"),
        pytest.param(KeepBestM(1), [0.1, 0.1, 0.2], {2}, id="tie-goes-to-newer"),
        pytest.param(KeepBestM(1, mode="max"), [0.9, 0.2, 0.9], {3}, id="tie-max-goes-to-newer"),
        pytest.param(KeepBestM(1), [math.nan, 0.5, 0.7], {2}, id="nan-never-best-min"),
        pytest.param(KeepBestM(1, mode="max"), [math.nan, 0.5, 0.7], {3}, id="nan-never-best-max"),
        pytest.param(KeepBestM(1), [0.5, -math.inf, 0.7], {1}, id="minus-inf-never-best-min"),
        pytest.param(KeepBestM(1, mode="max"), [0.5, math.inf, 0.7], {3}, id="inf-never-best-max"),
        pytest.param(KeepBestM(3), [math.nan, math.inf, 0.7], {3}, id="non-finite-not-kept"),
        pytest.param(KeepBestM(1), [None, 0.5, None, 0.4], {1, 3, 4}, id="missing-kept"),
        pytest.param(KeepBestM(1), ["n/a", 0.5, True], {1, 2, 3}, id="non-number-kept"),
        pytest.param(KeepBestM(5), [0.3, 0.1], {1, 2}, id="fewer-than-m"),
        pytest.param(KeepBestM(1), [3, 1, 2], {2}, id="int-values"),
    ],
)
def test_keep_best_selection(policy, metrics, expected_kept):
    checkpoints = [
        make_checkpoint(index, step=index, metrics={} if value is None else {"loss": value})
        for index, value in enumerate(metrics, start=1)
    ]

    kept = policy.select(checkpoints)

    assert kept == {f"checkpoint-step-{step}" for step in expected_kept}


def test_nan_newest_kept_only_by_invariant():
    checkpoints = steps_with_metric([0.2, 0.1, math.nan])

    assert KeepBestM(1).select(checkpoints) == {"checkpoint-step-2"}
    plan = plan_retention(KeepBestM(1), checkpoints)
    assert plan.keep == ["checkpoint-step-2", "checkpoint-step-3"]
    assert plan.delete == ["checkpoint-step-1"]


def test_nan_not_kept_once_newer_exists():
    history = simulate_saves(KeepBestM(1), steps_with_metric([0.2, math.nan, 0.3]))

    assert steps_of(history[1]) == [1, 2]
    assert steps_of(history[2]) == [1, 3]


def test_unknown_metric_deletes_nothing_and_warns(caplog):
    checkpoints = [
        make_checkpoint(index, step=index, metrics={"loss": 0.1 * index, "accuracy": 0.5})
        for index in range(1, 6)
    ]
    caplog.set_level(logging.WARNING, logger=retention.__name__)

    plan = plan_retention(KeepBestM(1, metric="val_loss"), checkpoints)

    assert plan.delete == []
    assert plan.keep == [checkpoint.name for checkpoint in checkpoints]
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "'val_loss'" in message
    assert "accuracy, loss" in message


def test_unknown_metric_in_composition_deletes_nothing(caplog):
    caplog.set_level(logging.WARNING, logger=retention.__name__)

    history = simulate_saves(
        KeepLastN(1) | KeepBestM(1, metric="eval/loss"), steps_with_metric([0.3, 0.2, 0.1])
    )

    assert steps_of(history[-1]) == [1, 2, 3]
    assert any("eval/loss" in record.getMessage() for record in caplog.records)


def test_unknown_metric_warns_once_per_policy(caplog):
    checkpoints = [make_checkpoint(index, step=index, metrics={"loss": 0.1}) for index in range(1, 4)]
    caplog.set_level(logging.DEBUG, logger=retention.__name__)
    policy = KeepBestM(1, metric="val_loss")

    for _ in range(3):
        plan_retention(policy, checkpoints)

    levels = [record.levelno for record in caplog.records if "val_loss" in record.getMessage()]
    assert levels == [logging.WARNING, logging.DEBUG, logging.DEBUG]


def test_unknown_metric_without_any_metrics_warns(caplog):
    checkpoints = [make_checkpoint(index, step=index) for index in range(1, 4)]
    caplog.set_level(logging.WARNING, logger=retention.__name__)

    kept = KeepBestM(1).select(checkpoints)

    assert kept == {checkpoint.name for checkpoint in checkpoints}
    assert "metrics present: none" in caplog.records[0].getMessage()


def test_known_metric_does_not_warn(caplog):
    caplog.set_level(logging.WARNING, logger=retention.__name__)

    KeepBestM(1).select(steps_with_metric([0.3, 0.2]))

    assert caplog.records == []


# KeepEveryNSteps and KeepLastN on their own.


@pytest.mark.parametrize(
    ("k", "steps", "expected"),
    [
        pytest.param(1, [1, 2, 3], {1, 2, 3}, id="k-1-keeps-all"),
        pytest.param(3, [1, 2, 3, 4, 5, 6], {3, 6}, id="multiples-of-3"),
        pytest.param(10, [0, 5, 10, 15], {0, 10}, id="step-zero-is-multiple"),
        pytest.param(7, [1, 2, 3], set(), id="none-match"),
        pytest.param(2, [None, 1, 2], {None, 2}, id="no-step-kept"),
    ],
)
def test_keep_every_n_steps(k, steps, expected):
    checkpoints = [make_checkpoint(index, step=step) for index, step in enumerate(steps)]
    names_by_step = {checkpoint.step: checkpoint.name for checkpoint in checkpoints}

    kept = KeepEveryNSteps(k).select(checkpoints)

    assert kept == {names_by_step[step] for step in expected}


@pytest.mark.parametrize(
    ("n", "count", "expected_sequences"),
    [
        pytest.param(1, 4, [4], id="n-1"),
        pytest.param(3, 2, [1, 2], id="fewer-than-n"),
        pytest.param(2, 0, [], id="empty"),
    ],
)
def test_keep_last_n(n, count, expected_sequences):
    checkpoints = [make_checkpoint(sequence) for sequence in range(1, count + 1)]

    kept = KeepLastN(n)(list(reversed(checkpoints)))

    assert kept == {f"checkpoint-{sequence}" for sequence in expected_sequences}


# Composition with plain callables.


def keep_even_steps(checkpoints: list[CheckpointInfo]) -> list[str]:
    return [checkpoint.name for checkpoint in checkpoints if checkpoint.step % 2 == 0]


@pytest.mark.parametrize(
    "policy",
    [
        pytest.param(KeepLastN(1) | keep_even_steps, id="callable-on-right"),
        pytest.param(keep_even_steps | KeepLastN(1), id="callable-on-left"),
        pytest.param(AnyOf([KeepLastN(1), keep_even_steps]), id="any-of-list"),
    ],
)
def test_composition_with_callable(policy):
    checkpoints = [make_checkpoint(step, step=step) for step in range(1, 8)]

    plan = plan_retention(policy, checkpoints)

    assert isinstance(policy, AnyOf)
    assert steps_of(c for c in checkpoints if c.name in plan.keep) == [2, 4, 6, 7]


def test_callable_receives_commit_order():
    received: list[list[int]] = []

    def record_order(checkpoints: list[CheckpointInfo]) -> set[str]:
        received.append([checkpoint.sequence for checkpoint in checkpoints])
        return set()

    checkpoints = [make_checkpoint(sequence) for sequence in (3, 1, 2)]

    as_policy(record_order).select(checkpoints)

    assert received == [[1, 2, 3]]


def test_composition_flattens_nested():
    policy = KeepLastN(1) | (KeepBestM(1) | KeepEveryNSteps(10)) | keep_even_steps

    assert [type(leaf) for leaf in policy.policies] == [
        KeepLastN,
        KeepBestM,
        KeepEveryNSteps,
        CallablePolicy,
    ]


def test_callable_as_plan_policy():
    checkpoints = [make_checkpoint(step, step=step) for step in range(1, 6)]

    plan = plan_retention(lambda found: [found[0].name], checkpoints)

    assert plan.keep == ["checkpoint-step-1", "checkpoint-step-5"]


def test_callable_unknown_names_ignored(caplog):
    checkpoints = [make_checkpoint(step, step=step) for step in range(1, 4)]
    caplog.set_level(logging.DEBUG, logger=retention.__name__)

    kept = as_policy(lambda found: ["checkpoint-step-1", "checkpoint-step-99"]).select(checkpoints)

    assert kept == {"checkpoint-step-1"}
    debug_messages = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(debug_messages) == 1
    assert "checkpoint-step-99" in debug_messages[0]


@pytest.mark.parametrize(
    ("returned", "expected_text"),
    [
        pytest.param(None, "NoneType", id="none"),
        pytest.param(3, "int", id="int"),
        pytest.param("checkpoint-step-1", "not an iterable of names", id="bare-str"),
        pytest.param([1, 2], "item 1 of type int", id="int-items"),
        pytest.param([make_checkpoint(1)], "CheckpointInfo", id="checkpoint-items"),
        pytest.param([b"checkpoint-step-1"], "bytes", id="bytes-items"),
    ],
)
def test_callable_bad_result_rejected(returned, expected_text):
    checkpoints = [make_checkpoint(step, step=step) for step in range(1, 3)]

    with pytest.raises(ConfigurationError, match=expected_text):
        plan_retention(lambda found: returned, checkpoints)


def test_callable_error_propagates_with_note():
    def broken(checkpoints: list[CheckpointInfo]) -> set[str]:
        raise KeyError("val_loss")

    checkpoints = [make_checkpoint(step, step=step) for step in range(1, 3)]

    with pytest.raises(KeyError) as caught:
        plan_retention(KeepLastN(1) | broken, checkpoints)

    notes = getattr(caught.value, "__notes__", [])
    if hasattr(caught.value, "add_note"):
        assert len(notes) == 1
        assert "broken" in notes[0]
        assert "2 checkpoints" in notes[0]


@pytest.mark.parametrize(
    "other",
    [pytest.param(3, id="int"), pytest.param("last", id="str"), pytest.param(None, id="none")],
)
def test_or_with_non_policy_raises_type_error(other):
    with pytest.raises(TypeError):
        KeepLastN(1) | other
    with pytest.raises(TypeError):
        other | KeepLastN(1)


# Protected names and the newest-checkpoint invariant in plan_retention.


def test_protected_names_survive_simulated_run():
    saves = [make_checkpoint(step, step=step) for step in range(1, 8)]

    history = simulate_saves(KeepLastN(2), saves, protected={"checkpoint-step-2"})

    assert steps_of(history[-1]) == [2, 6, 7]


def test_protected_unknown_names_ignored():
    checkpoints = [make_checkpoint(step, step=step) for step in range(1, 4)]

    plan = plan_retention(KeepLastN(1), checkpoints, protected=["checkpoint-step-1", "gone"])

    assert plan == RetentionPlan(
        keep=["checkpoint-step-1", "checkpoint-step-3"], delete=["checkpoint-step-2"]
    )


def test_newest_kept_when_policy_keeps_nothing():
    checkpoints = [make_checkpoint(step, step=step) for step in range(1, 4)]

    plan = plan_retention(lambda found: [], checkpoints)

    assert plan.keep == ["checkpoint-step-3"]
    assert plan.delete == ["checkpoint-step-1", "checkpoint-step-2"]


def test_plan_of_empty_list():
    assert plan_retention(KeepLastN(1), []) == RetentionPlan(keep=[], delete=[])
    assert explain(KeepLastN(1), []) == {}


@pytest.mark.parametrize(
    ("checkpoints", "expected_text"),
    [
        pytest.param(
            [make_checkpoint(1, name="a"), make_checkpoint(2, name="a")],
            r"names \['a'\]",
            id="duplicate-name",
        ),
        pytest.param(
            [make_checkpoint(1, name="a"), make_checkpoint(1, name="b")],
            r"sequence numbers \[1\]",
            id="duplicate-sequence",
        ),
    ],
)
def test_plan_rejects_ambiguous_list(checkpoints, expected_text):
    with pytest.raises(ConfigurationError, match=expected_text):
        plan_retention(KeepLastN(1), checkpoints)


@pytest.mark.parametrize(
    "protected",
    [
        pytest.param("checkpoint-step-1", id="bare-str"),
        pytest.param(5, id="int"),
        pytest.param([1], id="int-items"),
    ],
)
def test_plan_rejects_bad_protected(protected):
    checkpoints = [make_checkpoint(step, step=step) for step in range(1, 3)]

    with pytest.raises(ConfigurationError, match="protected"):
        plan_retention(KeepLastN(1), checkpoints, protected=protected)


# explain and describe.


def test_explain_lists_each_reason():
    checkpoints = steps_with_metric([0.1, 0.5, 0.6, 0.4, 0.7])
    policy = KeepLastN(1) | KeepBestM(2, metric="loss") | KeepEveryNSteps(2)

    reasons = explain(policy, checkpoints, protected=["checkpoint-step-3"])

    assert reasons == {
        "checkpoint-step-1": ["best 2 by loss (min)"],
        "checkpoint-step-2": ["every 2 steps"],
        "checkpoint-step-3": [PROTECTED_REASON],
        "checkpoint-step-4": ["best 2 by loss (min)", "every 2 steps"],
        "checkpoint-step-5": ["last 1", NEWEST_REASON],
    }
    plan = plan_retention(policy, checkpoints, protected=["checkpoint-step-3"])
    assert list(reasons) == plan.keep


def test_explain_newest_kept_only_by_invariant():
    checkpoints = steps_with_metric([0.1, math.nan])

    reasons = explain(KeepBestM(1), checkpoints)

    assert reasons == {
        "checkpoint-step-1": ["best 1 by loss (min)"],
        "checkpoint-step-2": [NEWEST_REASON],
    }


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        pytest.param(KeepLastN(3), "last 3", id="last"),
        pytest.param(KeepBestM(2, "val_loss"), "best 2 by val_loss (min)", id="best-min"),
        pytest.param(KeepBestM(1, "accuracy", "max"), "best 1 by accuracy (max)", id="best-max"),
        pytest.param(KeepEveryNSteps(500), "every 500 steps", id="every"),
        pytest.param(KeepAll(), "all", id="all"),
        pytest.param(CallablePolicy(keep_even_steps), "callable keep_even_steps", id="callable"),
        pytest.param(KeepLastN(1) | KeepBestM(1), "last 1 or best 1 by loss (min)", id="any-of"),
    ],
)
def test_describe(policy, expected):
    assert policy.describe() == expected


# as_policy and validation.


def test_as_policy_conversions():
    policy = KeepBestM(1)

    assert as_policy(None) == KeepLastN(3)
    assert as_policy(policy) is policy
    wrapped = as_policy(keep_even_steps)
    assert isinstance(wrapped, CallablePolicy)
    assert wrapped.function is keep_even_steps


@pytest.mark.parametrize(
    ("value", "expected_text"),
    [
        pytest.param(3, "Invalid retention policy 3 of type int", id="int"),
        pytest.param("last-3", "'last-3' of type str", id="str"),
        pytest.param([KeepLastN(1)], "of type list", id="list"),
        pytest.param(KeepLastN, "the class KeepLastN, not an instance", id="class"),
    ],
)
def test_as_policy_rejects(value, expected_text):
    with pytest.raises(ConfigurationError, match=expected_text) as caught:
        as_policy(value)

    assert "KeepLastN(3)" in str(caught.value)


@pytest.mark.parametrize(
    ("build", "expected_text"),
    [
        pytest.param(lambda: KeepLastN(0), r"KeepLastN\.n 0", id="last-zero"),
        pytest.param(lambda: KeepLastN(-2), r"KeepLastN\.n -2", id="last-negative"),
        pytest.param(lambda: KeepLastN(True), r"KeepLastN\.n True", id="last-bool"),
        pytest.param(lambda: KeepLastN(2.0), r"KeepLastN\.n 2\.0", id="last-float"),
        pytest.param(lambda: KeepLastN("3"), r"KeepLastN\.n '3'", id="last-str"),
        pytest.param(lambda: KeepBestM(0), r"KeepBestM\.m 0", id="best-zero"),
        pytest.param(lambda: KeepBestM(False), r"KeepBestM\.m False", id="best-bool"),
        pytest.param(lambda: KeepBestM(1, ""), r"KeepBestM\.metric ''", id="metric-empty"),
        pytest.param(lambda: KeepBestM(1, "  "), r"KeepBestM\.metric '  '", id="metric-blank"),
        pytest.param(lambda: KeepBestM(1, None), r"KeepBestM\.metric None", id="metric-none"),
        pytest.param(lambda: KeepBestM(1, "loss", "lowest"), "mode 'lowest'", id="mode"),
        pytest.param(lambda: KeepEveryNSteps(0), r"KeepEveryNSteps\.k 0", id="every-zero"),
        pytest.param(lambda: KeepEveryNSteps(True), r"KeepEveryNSteps\.k True", id="every-bool"),
        pytest.param(lambda: AnyOf([]), "list is empty", id="any-of-empty"),
        pytest.param(lambda: AnyOf(KeepLastN(1)), "expected a list", id="any-of-single"),
        pytest.param(lambda: AnyOf([KeepLastN(1), None]), "AnyOf policy None", id="any-of-none"),
        pytest.param(lambda: AnyOf([KeepLastN(1), 3]), "policy 3 of type int", id="any-of-int"),
        pytest.param(lambda: CallablePolicy(3), "expected a callable", id="callable-int"),
    ],
)
def test_validation_errors(build, expected_text):
    with pytest.raises(ConfigurationError, match=expected_text) as caught:
        build()

    # Every message names the fix as an example call or argument.
    assert "(" in str(caught.value) or "=" in str(caught.value)


def test_validation_error_is_value_error():
    with pytest.raises(ValueError):
        KeepLastN(0)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param(KeepLastN(3), KeepLastN(3), id="last"),
        pytest.param(KeepBestM(2, "acc", "max"), KeepBestM(2, "acc", "max"), id="best"),
        pytest.param(KeepEveryNSteps(5), KeepEveryNSteps(5), id="every"),
        pytest.param(KeepAll(), KeepAll(), id="all"),
        pytest.param(
            KeepLastN(1) | keep_even_steps, KeepLastN(1) | keep_even_steps, id="any-of"
        ),
    ],
)
def test_policies_equal_and_hashable(first, second):
    assert first == second
    assert hash(first) == hash(second)
    assert len({first, second}) == 1


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        pytest.param(KeepLastN(3), "n", id="last"),
        pytest.param(KeepBestM(), "metric", id="best"),
        pytest.param(KeepEveryNSteps(5), "k", id="every"),
        pytest.param(KeepLastN(1) | KeepAll(), "policies", id="any-of"),
    ],
)
def test_policies_frozen(policy, field):
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(policy, field, 1)


def test_policy_is_abstract():
    with pytest.raises(TypeError):
        RetentionPolicy()


def test_custom_subclass_composes():
    class KeepFirst(RetentionPolicy):
        def select(self, checkpoints: Sequence[CheckpointInfo]) -> set[str]:
            ordered = sorted(checkpoints, key=lambda checkpoint: checkpoint.sequence)
            return {ordered[0].name} if ordered else set()

    checkpoints = [make_checkpoint(step, step=step) for step in range(1, 5)]

    plan = plan_retention(KeepFirst() | KeepLastN(1), checkpoints)

    assert plan.keep == ["checkpoint-step-1", "checkpoint-step-4"]


def test_all_is_sorted():
    assert retention.__all__ == sorted(retention.__all__)
