"""The main job: train a classifier on scikit-learn's digits with HFManager, survive a crash, resume.

Run with ``make demo`` (or ``python examples/train_digits.py``). The script

1. trains a small MLP in a child process, saving a checkpoint every few steps
   with train and validation metrics under a composed retention policy;
2. kills that child with SIGKILL in the middle of an epoch;
3. resumes from the latest checkpoint in a new process and finishes training;
4. saves the final model as safetensors with its config, pushes everything to
   a Hub (by default a local Hub server started in-process), registers the
   architecture with transformers' Auto classes, reloads it through
   ``AutoModel`` and checks that the test accuracy is unchanged;
5. prints the summary and where every artifact is.

The digits data (1,797 8x8 images) ships inside scikit-learn, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from digits_common import (  # noqa: E402
    DigitsConfig,
    evaluate,
    load_splits,
    make_model,
    run_training,
)

DEFAULT_RUN_DIR = Path("demo_runs") / "digits"


def _child(phase: str, args: argparse.Namespace) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--phase", phase]
    command += ["--run-dir", str(args.run_dir), "--epochs", str(args.epochs)]
    command += ["--save-every", str(args.save_every)]
    return command


def _stream(process: subprocess.Popen, label: str, losses: dict[int, str], stop_at: int | None):
    """Echo a child's output (every 20th step line only) and record each step's loss.

    Returns the step after which the child was killed, or None when it ran to the end.
    """
    assert process.stdout is not None
    for line in process.stdout:
        parts = line.split()
        if line.startswith("step ") and len(parts) >= 6:
            step = int(parts[1])
            losses[step] = parts[5]
            if step % 20 == 0:
                print(f"  [{label}] {line.rstrip()}")
            if stop_at is not None and step >= stop_at:
                process.send_signal(signal.SIGKILL)
                process.wait()
                return step
        else:
            print(f"  [{label}] {line.rstrip()}")
    if process.wait() != 0:
        raise SystemExit(f"The {label} process failed with exit code {process.returncode}.")
    return None


def run_crashing_child(args: argparse.Namespace) -> tuple[int, dict[int, str]]:
    """Start training in a child process and SIGKILL it once it passes ``--crash-at-step``."""
    losses: dict[int, str] = {}
    process = subprocess.Popen(_child("train", args), stdout=subprocess.PIPE, text=True, bufsize=1)
    killed_at = _stream(process, "train", losses, args.crash_at_step)
    if killed_at is None:
        raise SystemExit("The training child finished before the crash point; lower --crash-at-step.")
    print(f"Killed the training process with SIGKILL after step {killed_at} (exit {process.returncode}).")
    return killed_at, losses


def run_resume_child(args: argparse.Namespace, killed_at: int, before: dict[int, str]) -> None:
    """Resume in a new process and compare the replayed steps with the killed run's losses."""
    after: dict[int, str] = {}
    process = subprocess.Popen(_child("resume", args), stdout=subprocess.PIPE, text=True, bufsize=1)
    _stream(process, "resume", after, None)
    replayed = sorted(step for step in after if step <= killed_at)
    same = all(after[step] == before[step] for step in replayed)
    if replayed:
        verdict = "the same losses as before the crash" if same else "DIFFERENT losses"
        print(f"Steps {replayed[0]}-{replayed[-1]}, trained again after the resume, gave {verdict}.")
    if not same:
        raise SystemExit("The resumed run diverged from the killed one.")


def phase_train(args: argparse.Namespace, resume: bool) -> None:
    from hf_lifecycle import HFManager, KeepBestM, KeepLastN

    config = DigitsConfig(epochs=args.epochs)
    splits = load_splits(config.seed)
    model, optimizer, scheduler = make_model(config, steps_per_epoch=splits.steps_per_epoch(config))
    manager = HFManager(
        local_dir=args.run_dir / "outputs",
        checkpoint_dir=args.run_dir / "checkpoints",
        retention_policy=KeepLastN(2) | KeepBestM(1, metric="val_loss", mode="min"),
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
    )
    manager.track_hyperparameters(config.to_dict())
    run_training(manager, model, optimizer, scheduler, splits, config, args.save_every, resume=resume)


def phase_finish(args: argparse.Namespace) -> None:
    """Final model, Hub push, Auto-class registration and reload, summary."""
    from finish_digits import finish

    finish(args)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR,
                        help="folder for outputs and checkpoints (emptied at the start)")
    parser.add_argument("--epochs", type=int, default=6, help="training epochs")
    parser.add_argument("--save-every", type=int, default=15, help="steps between checkpoints")
    parser.add_argument("--crash-at-step", type=int, default=100,
                        help="SIGKILL the training process once it reports this step")
    parser.add_argument("--repo-id", default=None,
                        help="push to this repository on the real Hub (needs a token); "
                             "default: a local Hub server started in-process")
    parser.add_argument("--phase", choices=["all", "train", "resume", "finish"], default="all",
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.run_dir = args.run_dir.resolve()
    if args.phase == "train":
        phase_train(args, resume=False)
        return
    if args.phase == "resume":
        phase_train(args, resume=True)
        return
    if args.phase == "finish":
        phase_finish(args)
        return

    started = time.monotonic()
    if args.run_dir.exists():
        shutil.rmtree(args.run_dir)
    args.run_dir.mkdir(parents=True)
    print(f"Run folder: {args.run_dir}")
    print("1. Training in a child process, which will be killed mid-epoch")
    killed_at, losses = run_crashing_child(args)
    print("2. Resuming from the latest checkpoint in a new process")
    run_resume_child(args, killed_at, losses)
    print("3. Final model, Hub push, Auto-class registration")
    command = _child("finish", args)
    if args.repo_id:
        command += ["--repo-id", args.repo_id]
    subprocess.run(command, check=True)
    print(f"Done in {time.monotonic() - started:.1f} s.")


if __name__ == "__main__":
    main()
