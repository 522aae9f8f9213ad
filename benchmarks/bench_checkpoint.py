"""Benchmark checkpoint saving and loading against the disk, torch, safetensors and accelerate.

Run with ``make bench`` (or ``.venv/bin/python benchmarks/bench_checkpoint.py``). All
methods run in one process on the same state, interleaved: each repetition saves with
every method in turn (the order rotates between repetitions), and a second loop loads
files saved once by every method in the same way. The table reports medians. The files'
pages are dropped from the page cache with ``posix_fadvise(POSIX_FADV_DONTNEED)`` before
each load, so loads read from the disk. Peak memory is measured in a fresh subprocess per
method. A full run writes BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _bench_methods import METHODS
from _bench_report import Result, StateResults, render_report, write_markdown
from _bench_states import build_large_state, build_small_state, drop_page_cache
from hf_lifecycle import HFManager, KeepAll
from hf_lifecycle.checkpoint.serialize import build_state, write_state

REPO_ROOT = Path(__file__).resolve().parent.parent
SMALL_BLOCKS = 500
QUICK_SMALL_BLOCKS = 100
# Pause after each save (and its deletion) before the next timed step: the minimum, plus
# this much per GB written. On a virtual disk, timed steps that followed a large write
# measured slower and noisier, even after fsync and sync.
SETTLE_SECONDS_MIN = 0.2
SETTLE_SECONDS_PER_GB = 1.0
# Output tag of the files that the loads read, apart from those the timed saves write.
LOAD_SOURCE = 1000
MEMORY_METHODS = ["torch", "safetensors", "accelerate", "hf_lifecycle", "hf_lifecycle_async"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeat", type=int, default=None,
        help="timed repetitions per method, after one warm-up (default 7, 3 with --quick)",
    )
    parser.add_argument(
        "--size-gb", type=float, default=None,
        help="size of the large state in GB, weights + AdamW state (default 1.0, 0.1 with --quick)",
    )
    parser.add_argument(
        "--checkpoints", type=int, default=None,
        help="checkpoints present for the listing benchmark (default 1000, 100 with --quick)",
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="a fast smoke run with small sizes; writes no report unless --output is given",
    )
    parser.add_argument(
        "--dir", type=Path, default=None,
        help="folder to write in (default: a new temporary folder, removed afterwards)",
    )
    parser.add_argument(
        "--output", type=Path, default=None,
        help="Markdown report to write (default BENCHMARKS.md for a full run)",
    )
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.repeat is None:
        args.repeat = 3 if args.quick else 7
    if args.size_gb is None:
        args.size_gb = 0.1 if args.quick else 1.0
    if args.checkpoints is None:
        args.checkpoints = 100 if args.quick else 1000
    if args.output is None and not args.quick:
        args.output = REPO_ROOT / "BENCHMARKS.md"
    if args.repeat < 1 or args.size_gb <= 0 or args.checkpoints < 1:
        parser.error("--repeat, --size-gb and --checkpoints must be positive")
    return args


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# Save and load --------------------------------------------------------------------------------


def settle_seconds(nbytes: int) -> float:
    """Return how long to pause after writing ``nbytes``, before the next timed step."""
    return SETTLE_SECONDS_MIN + nbytes / 1e9 * SETTLE_SECONDS_PER_GB


def settle_disk(seconds: float) -> None:
    """Flush the page cache to the disk, then pause so the disk can finish absorbing it."""
    os.sync()
    time.sleep(seconds)


def rotated(methods: list, rep: int) -> list:
    """Return ``methods`` starting at a different one in each repetition."""
    shift = rep % len(methods)
    return methods[shift:] + methods[:shift]


def run_methods(state, folder: Path, repeat: int) -> StateResults:
    """Save, then load, ``state`` ``repeat`` times with every available method, interleaved."""
    methods = [cls(state, folder / cls.key) for cls in METHODS]
    results = {
        method.key: Result(method.key, method.label, inspect.cleandoc(type(method).__doc__ or ""))
        for method in methods
    }
    active = []
    for method in methods:
        reason = method.available()
        if reason:
            results[method.key].missing = reason
            log(f"  {method.key}: not available ({reason})")
        else:
            active.append(method)
    settle = settle_seconds(state.nbytes)
    # Repetition 0 of each loop is a warm-up whose times are dropped: in a fresh process the
    # first writes and allocations also pay for memory the machine has not handed out before.
    for rep in range(repeat + 1):
        for method in rotated(active, rep):
            gc.collect()
            timings = method.save(rep)
            method.remove(rep)
            settle_disk(settle)
            if rep:
                for name, seconds in timings.items():
                    results[method.key].times.setdefault(name, []).append(seconds)
        if rep:
            summary = ", ".join(f"{m.key} {results[m.key].times['save'][-1]:.2f}s" for m in active)
            log(f"  repetition {rep}/{repeat}: save {summary}")

    # Loads read files saved once, after the disk has settled, so that no load competes with
    # the disk still absorbing a save. Each load starts with the file's pages dropped.
    loaders = [method for method in active if method.has_load]
    for method in loaders:
        method.save(LOAD_SOURCE)
    settle_disk(settle)
    for rep in range(repeat + 1):
        for method in rotated(loaders, rep):
            drop_page_cache(method.output(LOAD_SOURCE))
            gc.collect()
            seconds = method.load(LOAD_SOURCE)
            if rep:
                results[method.key].times.setdefault("load", []).append(seconds)
    for method in loaders:
        method.remove(LOAD_SOURCE)
    settle_disk(settle)
    return StateResults(state.label, state.description, state.nbytes, state.tensor_count, results)


# Peak memory ----------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line")


def memory_child(args: argparse.Namespace) -> None:
    """Save once with one method and print the peak resident memory it added, as JSON."""
    classes = {cls.key: cls for cls in METHODS}
    cls = classes[args.memory_child]
    folder = Path(args.dir)
    # A first save of a tiny state pays for lazy imports and one-time set-up (for the
    # library, the HFManager's worker threads), which do not grow with the state and would
    # otherwise count as the measured save's memory. Where the method allows it, the same
    # object saves both states, as a training run saves many times with one manager.
    state = build_large_state(args.size_gb)
    method = cls(build_small_state(1), folder / "warm-up")
    method.train_between = False  # Only the save's own memory counts.
    reason = method.available()
    if reason:
        print(json.dumps({"missing": reason}))
        return
    method.save(0)
    if not method.switch_state(state):
        method = cls(state, folder / "measured")
        method.train_between = False
    gc.collect()
    before = _status_kib("VmRSS")
    # Writing 5 to clear_refs resets the peak (VmHWM) to the current RSS (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")
    method.save(1)
    peak = _status_kib("VmHWM")
    print(json.dumps({"before_kib": before, "peak_kib": peak, "state_bytes": state.nbytes}))


def measure_memory(args: argparse.Namespace, folder: Path) -> dict[str, dict]:
    """Run one fresh subprocess per method and collect its peak RSS increase."""
    measured = {}
    for key in MEMORY_METHODS:
        child_dir = folder / f"memory-{key}"
        command = [
            sys.executable, str(Path(__file__).resolve()), "--memory-child", key,
            "--size-gb", str(args.size_gb), "--dir", str(child_dir),
        ]
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        shutil.rmtree(child_dir, ignore_errors=True)
        if completed.returncode != 0:
            raise RuntimeError(f"memory measurement for {key} failed:\n{completed.stderr}")
        measured[key] = json.loads(completed.stdout.strip().splitlines()[-1])
        log(f"  {key}: {measured[key]}")
    return measured


# Listing --------------------------------------------------------------------------------------


def fill_checkpoints(manager: HFManager, count: int) -> None:
    """Commit ``count`` tiny checkpoints through the manager's store.

    This is the store's own commit path (files fsynced, manifest last, rename) without the
    metadata file and retention pass that ``save_checkpoint`` adds to every save, which with
    hundreds of checkpoints present would make filling the folder take minutes.
    """
    state = build_state(
        model=torch.nn.Linear(4, 4), optimizer=None, scheduler=None, rng_state=None,
        custom_state=None, config=None, allow_pickle=False,
    )
    for step in range(count):
        pending = manager.store.begin(f"checkpoint-step-{step}")
        manifest = {
            "step": step,
            "epoch": None,
            "metrics": {"loss": 1.0 / (step + 1)},
            "timestamp": time.time(),
            "components": write_state(pending, state),
        }
        manager.store.commit(pending, manifest)


def run_listing(folder: Path, count: int, repeat: int) -> dict[str, object]:
    """Fill a folder with ``count`` tiny checkpoints, then time listing and finding the newest."""
    checkpoints = folder / "checkpoints"
    outputs = folder / "outputs"
    manager = HFManager(checkpoint_dir=checkpoints, local_dir=outputs, retention_policy=KeepAll())
    start = time.perf_counter()
    fill_checkpoints(manager, count)
    created = time.perf_counter() - start
    times: dict[str, list[float]] = {}

    def record(name: str, seconds: float) -> None:
        times.setdefault(name, []).append(seconds)

    for _ in range(repeat):
        start = time.perf_counter()
        fresh = HFManager(checkpoint_dir=checkpoints, local_dir=outputs, retention_policy=KeepAll())
        record("HFManager() construction", time.perf_counter() - start)
        start = time.perf_counter()
        listed = fresh.list_checkpoints()
        record("list_checkpoints(), fresh manager", time.perf_counter() - start)
        start = time.perf_counter()
        listed = fresh.list_checkpoints()
        record("list_checkpoints(), warm manager", time.perf_counter() - start)
        if len(listed) != count:
            raise RuntimeError(f"list_checkpoints() returned {len(listed)} entries, not {count}")
        fresh = HFManager(checkpoint_dir=checkpoints, local_dir=outputs, retention_policy=KeepAll())
        start = time.perf_counter()
        latest = fresh.list_checkpoints()[0]
        record("latest = list_checkpoints()[0], fresh manager", time.perf_counter() - start)
        start = time.perf_counter()
        latest = fresh.list_checkpoints()[0]
        record("latest = list_checkpoints()[0], warm manager", time.perf_counter() - start)
        if latest["step"] != count - 1:
            raise RuntimeError(f"the newest checkpoint is step {latest['step']}, not {count - 1}")
    model = torch.nn.Linear(4, 4)
    for step in range(count, count + repeat):
        start = time.perf_counter()
        manager.save_checkpoint(model=model, step=step)
        seconds = time.perf_counter() - start
        record(f"save_checkpoint of one Linear(4, 4), {count}+ present", seconds)
    return {"count": count, "created_s": created, "times": times}


# Main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_child:
        memory_child(args)
        return 0

    started = time.perf_counter()
    load_averages = [os.getloadavg()]
    owned = args.dir is None
    folder = Path(tempfile.mkdtemp(prefix="hf-lifecycle-bench-")) if owned else args.dir
    folder.mkdir(parents=True, exist_ok=True)

    try:
        log(f"Building the states (large: {args.size_gb} GB) in {folder}")
        states = [
            build_large_state(args.size_gb),
            build_small_state(QUICK_SMALL_BLOCKS if args.quick else SMALL_BLOCKS),
        ]
        results = []
        for state in states:
            log(f"State {state.label}: {state.description}, {state.nbytes / 1e9:.3f} GB")
            results.append(run_methods(state, folder / state.label, args.repeat))
            shutil.rmtree(folder / state.label, ignore_errors=True)
        del states
        gc.collect()

        log("Peak memory, one subprocess per method")
        memory = measure_memory(args, folder)

        log(f"Listing with {args.checkpoints} checkpoints")
        listing = run_listing(folder / "listing", args.checkpoints, args.repeat)
    finally:
        if owned:
            shutil.rmtree(folder, ignore_errors=True)

    report = render_report(
        args=args,
        states=results,
        memory=memory,
        listing=listing,
        folder=folder,
        elapsed=time.perf_counter() - started,
        load_averages=load_averages + [os.getloadavg()],
        settle=(SETTLE_SECONDS_MIN, SETTLE_SECONDS_PER_GB),
    )
    print(report)
    if args.output is not None:
        write_markdown(args.output, report)
        log(f"Wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
