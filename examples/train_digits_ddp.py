"""The digits job on two ranks: DDP training with HFManager, interrupted, resumed, finished.

Run with ``make demo-ddp``, which is
``torchrun --standalone --nproc_per_node=2 examples/train_digits_ddp.py``. Every rank runs
this script and makes the same HFManager calls; rank 0 names, writes, commits and pushes
the checkpoints. The script

1. trains the digits MLP wrapped in DistributedDataParallel on the CPU (gloo backend),
   each rank on its half of every epoch's batches, saving a checkpoint every few steps
   under a composed retention policy and pushing each one in the background;
2. stops at ``--interrupt-at-step`` and drops the model, optimizer and manager, as a
   restarted job would have lost them;
3. builds them anew, resumes from the latest checkpoint (every rank gets its own RNG
   state back) and finishes training;
4. saves the final model as safetensors, checks its test accuracy after reloading it,
   pushes everything and prints the summary (rank 0).

By default the pushes go to a Hub-compatible server that rank 0 starts on 127.0.0.1;
``--repo-id`` with a token pushes to the real Hub instead.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from digits_common import (  # noqa: E402
    DigitsConfig,
    epoch_order,
    evaluate,
    load_splits,
    make_model,
    seed_everything,
)

DEFAULT_RUN_DIR = Path("demo_runs") / "digits_ddp"
LOCAL_USER = "demo"
# A token for the local server only; it grants nothing anywhere else.
LOCAL_TOKEN = "hf_local_demo_token"


def start_local_hub(run_dir: Path):
    """Start a local Hub on rank 0 and point every rank's Hub client at it. Returns the server."""
    server = None
    endpoint = [None]
    if dist.get_rank() == 0:
        from hf_lifecycle.hub.server import LocalHub

        server = LocalHub(run_dir / "local_hub")
        server.start()
        server.add_user(LOCAL_USER, token=LOCAL_TOKEN)
        endpoint = [server.endpoint]
    dist.broadcast_object_list(endpoint, src=0)
    # huggingface_hub reads these when it is first imported, which happens after this point.
    os.environ.update(
        HF_ENDPOINT=endpoint[0],
        HF_TOKEN=LOCAL_TOKEN,
        HF_HOME=str(run_dir / "hf_home"),
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
    )
    return server


def rank_batches(size: int, config: DigitsConfig, epoch: int) -> list[torch.Tensor]:
    """This rank's batches of one epoch: every other sample of the epoch's shuffled order."""
    order = epoch_order(size, config.seed, epoch)[dist.get_rank() :: dist.get_world_size()]
    starts = range(0, len(order), config.batch_size)
    return [order[start : start + config.batch_size] for start in starts]


def build(args: argparse.Namespace, config: DigitsConfig, steps_per_epoch: int):
    """Build the DDP model, its optimizer and scheduler, and a manager that saves them."""
    from hf_lifecycle import HFManager, KeepBestM, KeepLastN

    model, optimizer, scheduler = make_model(config, steps_per_epoch=steps_per_epoch)
    # Same initial weights on every rank (DDP also broadcasts rank 0's), own dropout masks.
    seed_everything(config.seed + 1000 * dist.get_rank())
    model = DistributedDataParallel(model)
    manager = HFManager(
        repo_id=args.repo_id,
        local_dir=args.run_dir / "outputs",
        checkpoint_dir=args.run_dir / "checkpoints",
        retention_policy=KeepLastN(2) | KeepBestM(1, metric="val_loss", mode="min"),
        auto_push=True,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
    )
    manager.track_hyperparameters({**config.to_dict(), "world_size": dist.get_world_size()})
    return model, optimizer, scheduler, manager


def train(
    args, config, splits, model, optimizer, scheduler, manager, *, stop_at: int | None
) -> int:
    """Train from the latest checkpoint (if any) until the end or ``stop_at``; return the step."""
    steps_per_epoch = len(rank_batches(len(splits.x_train), config, 0))
    start_epoch, start_batch, step = 0, 0, 0
    loaded = manager.load_latest_checkpoint()
    if loaded is not None:
        start_epoch = loaded["custom_state"]["epoch"]
        start_batch = loaded["custom_state"]["batch_in_epoch"]
        step = loaded["step"]
        report(f"Resumed from {loaded['name']} (epoch {start_epoch}, batch {start_batch}, "
               f"step {step}).")
    model.train()
    for epoch in range(start_epoch, config.epochs):
        batches = rank_batches(len(splits.x_train), config, epoch)
        for batch in range(start_batch if epoch == start_epoch else 0, steps_per_epoch):
            index = batches[batch]
            loss = nn.functional.cross_entropy(model(splits.x_train[index]), splits.y_train[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            learning_rate = scheduler.get_last_lr()[0]
            manager.log_metrics({"train_loss": loss.item(), "lr": learning_rate}, step=step)
            if step % args.save_every == 0 or step == stop_at:
                val_loss, val_accuracy = evaluate(model.module, splits.x_val, splits.y_val)
                manager.log_metrics({"val_loss": val_loss, "val_accuracy": val_accuracy}, step=step)
                # The position of the next batch, so a resume skips exactly what was consumed.
                position = {"epoch": epoch, "batch_in_epoch": batch + 1}
                if batch + 1 == steps_per_epoch:
                    position = {"epoch": epoch + 1, "batch_in_epoch": 0}
                metrics = {"train_loss": loss.item(), "val_loss": val_loss,
                           "val_accuracy": val_accuracy}
                manager.save_checkpoint(
                    step=step, epoch=epoch, metrics=metrics, custom_state=position,
                    config=config.to_dict(),
                )
                report(f"step {step}: val_loss {val_loss:.4f}, val_accuracy {val_accuracy:.4f}, "
                       f"checkpoints {[entry['name'] for entry in manager.list_checkpoints()]}")
            if step == stop_at:
                return step
    return step


def report(line: str) -> None:
    if dist.get_rank() == 0:
        print(line, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR,
                        help="folder for outputs and checkpoints (emptied at the start)")
    parser.add_argument("--epochs", type=int, default=6, help="training epochs")
    parser.add_argument("--save-every", type=int, default=10, help="steps between checkpoints")
    parser.add_argument("--interrupt-at-step", type=int, default=25,
                        help="drop every training object after this step and resume from "
                             "the latest checkpoint")
    parser.add_argument("--repo-id", default=None,
                        help="push to this repository on the real Hub (needs a token); "
                             "default: a local Hub server started by rank 0")
    args = parser.parse_args(argv)
    args.run_dir = args.run_dir.resolve()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    server = None
    try:
        if dist.get_rank() == 0 and args.run_dir.exists():
            shutil.rmtree(args.run_dir)
        dist.barrier()
        if args.repo_id is None:
            server = start_local_hub(args.run_dir)
            args.repo_id = f"{LOCAL_USER}/digits-mlp-ddp"
        run(args)
        # Every rank finishes its collectives before any rank tears its process group down.
        dist.barrier()
    finally:
        if server is not None:
            server.stop()
        dist.destroy_process_group()


def run(args: argparse.Namespace) -> None:
    from hf_lifecycle import load_model_weights

    config = DigitsConfig(epochs=args.epochs)
    splits = load_splits(config.seed)
    steps_per_epoch = len(rank_batches(len(splits.x_train), config, 0))
    report(f"1. Training on {dist.get_world_size()} ranks until step {args.interrupt_at_step}")
    objects = build(args, config, steps_per_epoch)
    train(args, config, splits, *objects, stop_at=args.interrupt_at_step)
    objects[-1].close()
    del objects

    report("2. Resuming with new objects from the latest checkpoint")
    model, optimizer, scheduler, manager = build(args, config, steps_per_epoch)
    with manager:
        step = train(args, config, splits, model, optimizer, scheduler, manager, stop_at=None)
        test_loss, test_accuracy = evaluate(model.module, splits.x_test, splits.y_test)
        manager.log_metrics({"test_loss": test_loss, "test_accuracy": test_accuracy}, step=step)
        final_dir = manager.save_final_model(format="safetensors", config=config.to_dict())
        fresh, _, _ = make_model(config, steps_per_epoch=steps_per_epoch)
        load_model_weights(fresh, final_dir)
        _, reloaded_accuracy = evaluate(fresh, splits.x_test, splits.y_test)
        if reloaded_accuracy != test_accuracy:
            raise SystemExit(f"Reloaded accuracy {reloaded_accuracy} differs from {test_accuracy}.")
        report("3. Pushing the final model")
        manager.push(push_final_model=True,
                     commit_message="Digits MLP (DDP): checkpoints and final model")
    report("")
    report(manager.get_summary())
    report("")
    report(f"Test accuracy: {test_accuracy:.4f} (test loss {test_loss:.4f}); the reloaded final "
           f"model gives {reloaded_accuracy:.4f}")
    report(f"Checkpoints: {manager.checkpoint_dir}")
    report(f"Final model: {final_dir}")
    report(f"Hub repository: {manager.repo_url}")


if __name__ == "__main__":
    main()
