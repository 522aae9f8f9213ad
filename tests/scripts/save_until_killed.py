"""Save checkpoints in forked children that die by SIGKILL, for the crash-safety tests.

Usage: ``save_until_killed.py CHECKPOINT_DIR LOCAL_DIR``. The process builds a model with a
few MB of weights once, then reads one command per line on stdin and forks a child for each,
so that every kill costs a fork instead of a new interpreter:

``round``
    Run one round of saves to the end. Prints ``events`` followed by the name of each
    file-system event it made, in order (open, write, fsync, mkdir, rename, replace, unlink,
    rmtree, rename_exchange).
``kill-at N``
    Run one round, and send SIGKILL to the child itself just before its N-th event.
``loop``
    Save again and again, printing ``saving I`` before each save, until killed from outside.
    Prints ``pid P`` first so that the caller can kill the child.

After each command the child is reaped and ``exit CODE`` is printed, CODE being the negative
signal number when a signal ended it. A round saves ``round-R-a`` (a new name), ``latest``
(replacing the previous round's) and ``round-R-b``. Retention keeps the last 3 and ``latest``,
so rounds also delete, and ``latest`` is only ever replaced.
Each save writes a marker into the weights and custom_state, which must agree after loading.
"""

from __future__ import annotations

import builtins
import os
import shutil
import signal
import sys

import torch

torch.set_num_threads(1)  # No OpenMP worker threads in the parent, so forking is safe.

from hf_lifecycle import HFManager, KeepLastN  # noqa: E402
from hf_lifecycle.checkpoint import store, tensorfile  # noqa: E402


def build_training_objects():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.001)
    model(torch.randn(2, 512)).sum().backward()
    optimizer.step()
    return model, optimizer


class EventCounter:
    """Counts file-system events and sends SIGKILL to this process before event ``kill_at``."""

    def __init__(self, kill_at: int | None) -> None:
        self.kill_at = kill_at
        self.events: list[str] = []

    def tick(self, name: str) -> None:
        self.events.append(name)
        if len(self.events) == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(self, function, name: str):
        def counted(*args, **kwargs):
            self.tick(name)
            return function(*args, **kwargs)

        return counted

    def install(self) -> None:
        for module, name in [
            (builtins, "open"),
            (os, "fsync"),
            (os, "rename"),
            (os, "replace"),
            (os, "mkdir"),
            (os, "unlink"),
            (shutil, "rmtree"),
            (store, "_rename_exchange"),
            (tensorfile._HashingWriter, "write"),
        ]:
            setattr(module, name, self.wrap(getattr(module, name), name.strip("_")))


def keep_latest(checkpoints) -> list[str]:
    return ["latest"]


def emit(text: str) -> None:
    os.write(1, (text + "\n").encode())


def save(manager, model, optimizer, name: str, marker: float) -> None:
    with torch.no_grad():
        model[0].weight[0, 0] = marker
    manager.save_checkpoint(model, optimizer, name=name, custom_state={"marker": marker})


def run_round(manager, model, optimizer, round_index: int) -> None:
    names = [f"round-{round_index}-a", "latest", f"round-{round_index}-b"]
    for offset, name in enumerate(names):
        save(manager, model, optimizer, name, marker=float(round_index * 10 + offset))


def run_child(command: str, argument: int | None, round_index: int, folders: list[str]) -> None:
    model, optimizer = MODEL, OPTIMIZER
    manager = HFManager(
        local_dir=folders[1], checkpoint_dir=folders[0], retention_policy=KeepLastN(3) | keep_latest
    )
    if command == "loop":
        index = 0
        while True:
            emit(f"saving {index}")
            save(manager, model, optimizer, f"loop-{round_index}-{index % 4}", float(index))
            index += 1
    counter = EventCounter(argument if command == "kill-at" else None)
    counter.install()
    run_round(manager, model, optimizer, round_index)
    if command == "round":
        emit("events " + " ".join(counter.events))


def main(folders: list[str]) -> None:
    emit("ready")
    for round_index, line in enumerate(sys.stdin):
        command, _, argument = line.strip().partition(" ")
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                run_child(command, int(argument) if argument else None, round_index, folders)
            except BaseException as err:  # Report, then leave without running the parent's code.
                emit(f"error {type(err).__name__}: {err}")
                code = 1
            os._exit(code)
        if command == "loop":
            emit(f"pid {pid}")
        _, status = os.waitpid(pid, 0)
        emit(f"exit {os.waitstatus_to_exitcode(status)}")


MODEL, OPTIMIZER = build_training_objects()

if __name__ == "__main__":
    main(sys.argv[1:])
