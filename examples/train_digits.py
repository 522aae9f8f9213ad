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


def run_crashing_child(args: argparse.Namespace) -> int:
    """Start training in a child process and SIGKILL it once it passes ``--crash-at-step``."""
    process = subprocess.Popen(
        _child("train", args), stdout=subprocess.PIPE, text=True, bufsize=1
    )
    killed_at = -1
    assert process.stdout is not None
    for line in process.stdout:
        print(f"  [train] {line.rstrip()}")
        if line.startswith("step ") and int(line.split()[1]) >= args.crash_at_step:
            process.send_signal(signal.SIGKILL)
            killed_at = int(line.split()[1])
            break
    process.wait()
    if killed_at < 0:
        raise SystemExit("The training child finished before the crash point; lower --crash-at-step.")
    print(f"Killed the training process with SIGKILL after step {killed_at} (exit {process.returncode}).")
    return killed_at


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
    run_crashing_child(args)
    print("2. Resuming from the latest checkpoint in a new process")
    subprocess.run(_child("resume", args), check=True)
    print("3. Final model, Hub push, Auto-class registration")
    command = _child("finish", args)
    if args.repo_id:
        command += ["--repo-id", args.repo_id]
    subprocess.run(command, check=True)
    print(f"Done in {time.monotonic() - started:.1f} s.")


if __name__ == "__main__":
    main()
