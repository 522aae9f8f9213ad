"""One rank of a multi-process HFManager test.

tests/test_distributed.py starts this script once per rank with the environment torchrun
gives its workers; ``torchrun --nproc_per_node=2 worker.py SCENARIO OUT_DIR [--repo-id ID]
[--phase PHASE]`` runs it the same way. Each rank writes what it observed to
``OUT_DIR/<scenario>-rank<r>.json`` and tensors to ``.pt`` files there, for the test to
compare. A rank that fails exits non-zero.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from hf_lifecycle import DistributedError, HFManager, KeepBestM, KeepLastN

PROCESS_GROUP_TIMEOUT = datetime.timedelta(seconds=60)
MODEL_SEED = 11
STEPS = 8


class Net(nn.Module):
    """A small classifier with dropout, so every rank's RNG changes the result."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.25), nn.Linear(32, 32), nn.ReLU(),
            nn.Linear(32, 4),
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.layers(inputs)


def seed_rank(seed: int, rank: int) -> None:
    """Give each rank its own Python, NumPy and torch generator state."""
    random.seed(seed * 100 + rank)
    np.random.seed(seed * 100 + rank)
    torch.manual_seed(seed * 100 + rank)


def build_ddp(model_seed: int = MODEL_SEED):
    torch.manual_seed(model_seed)
    model = DistributedDataParallel(Net())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    return model, optimizer, scheduler


def train(model, optimizer, scheduler, steps: int) -> float:
    """Train on per-rank batches drawn from this rank's torch, NumPy and Python generators."""
    model.train()
    loss = torch.zeros(())
    for _ in range(steps):
        inputs = torch.randn(8, 16) * (1.0 + random.random()) + float(np.random.rand())
        labels = torch.randint(0, 4, (8,))
        loss = nn.functional.cross_entropy(model(inputs), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return float(loss.detach())


def snapshot(model, optimizer, scheduler) -> dict:
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    return {
        "model": {key: value.clone() for key, value in inner.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state()[1].copy(),
            "python": random.getstate(),
        },
    }


def write_result(out: Path, label: str, result: dict) -> None:
    path = out / f"{label}-rank{dist.get_rank()}.json"
    path.write_text(json.dumps(result, indent=2, sort_keys=True))


def names(manager: HFManager) -> list[str]:
    return [entry["name"] for entry in manager.list_checkpoints()]


# Scenarios -----------------------------------------------------------------------------------


def ddp_hub(args) -> None:
    """Train with DDP, save every 2 steps with retention and auto_push, then flush the pushes."""
    rank = dist.get_rank()
    model, optimizer, scheduler = build_ddp()
    seed_rank(3, rank)
    manager = HFManager(
        repo_id=args.repo_id, local_dir=args.out / "outputs", checkpoint_dir=args.out / "ckpt",
        retention_policy=KeepLastN(2), auto_push=True, model=model, optimizer=optimizer,
        scheduler=scheduler, push_retry_wait=0.1,
    )
    paths, listings = [], []
    for step in range(2, STEPS + 1, 2):
        loss = train(model, optimizer, scheduler, 2)
        paths.append(manager.save_checkpoint(step=step, metrics={"loss": loss}))
        listings.append(names(manager))
    manager.close()
    result = {"paths": paths, "listings": listings, "final": names(manager)}
    write_result(args.out, "ddp_hub", result)


def ddp_resume(args) -> None:
    """Phase "first": an uninterrupted run, then half of the same run saved. Phase "second":
    fresh objects resume the saved half and finish it."""
    rank = dist.get_rank()
    checkpoint_dir = args.out / "ckpt"
    if args.phase == "first":
        model, optimizer, scheduler = build_ddp()
        seed_rank(5, rank)
        train(model, optimizer, scheduler, STEPS)
        torch.save(snapshot(model, optimizer, scheduler), args.out / f"straight-rank{rank}.pt")

        model, optimizer, scheduler = build_ddp()
        seed_rank(5, rank)
        train(model, optimizer, scheduler, STEPS // 2)
        manager = HFManager(local_dir=args.out / "outputs", checkpoint_dir=checkpoint_dir)
        manager.save_checkpoint(model, optimizer, scheduler, step=STEPS // 2)
        torch.save(snapshot(model, optimizer, scheduler), args.out / f"half-rank{rank}.pt")
        manager.close()
        return

    # A checkpoint saved by one process from an unwrapped model loads into the DDP model.
    model, optimizer, scheduler = build_ddp(model_seed=MODEL_SEED + 1)
    plain = HFManager(local_dir=args.out / "plain-outputs", checkpoint_dir=args.out / "plain-ckpt")
    plain.load_latest_checkpoint(model)
    torch.save(model.module.state_dict(), args.out / f"plain-into-ddp-rank{rank}.pt")
    plain.close()

    model, optimizer, scheduler = build_ddp(model_seed=MODEL_SEED + 2)
    seed_rank(99, rank)
    manager = HFManager(local_dir=args.out / "outputs", checkpoint_dir=checkpoint_dir)
    loaded = manager.load_latest_checkpoint(model, optimizer, scheduler)
    train(model, optimizer, scheduler, STEPS - loaded["step"])
    torch.save(snapshot(model, optimizer, scheduler), args.out / f"resumed-rank{rank}.pt")
    manager.close()


def build_fsdp(model_seed: int):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(model_seed)
    model = Net()
    for layer in model.layers:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    return model, optimizer, scheduler


def failing_shard_write(manager: HFManager, rank: int, out: Path) -> None:
    """Save once while rank 1's DCP writer fails, and record what every rank saw."""
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    real_write_data = FileSystemWriter.write_data

    def failing_write_data(self, plan, planner):
        raise OSError(28, "No space left on device (injected)")

    if rank == 1:
        FileSystemWriter.write_data = failing_write_data
    try:
        manager.save_checkpoint(step=2)
    except DistributedError as err:
        write_result(out, "fsdp-shard-failure", {
            "ranks": err.ranks, "message": str(err), "listing": names(manager),
            "temporary": sorted(path.name for path in manager.checkpoint_dir.glob(".tmp-*")),
        })
    finally:
        FileSystemWriter.write_data = real_write_data


def fsdp(args) -> None:
    """Phase "save": train an FSDP2 model and save it sharded. Phase "load": a fresh FSDP2
    model loads it. Each phase writes the full state dict, and the one after one more step."""
    from hf_lifecycle.distributed import full_model_state

    rank = dist.get_rank()
    if args.phase == "save":
        model, optimizer, scheduler = build_fsdp(MODEL_SEED)
        seed_rank(7, rank)
        train(model, optimizer, scheduler, 3)
    else:
        model, optimizer, scheduler = build_fsdp(MODEL_SEED + 1)
        # A checkpoint of an unsharded model: its weights load, its optimizer state cannot.
        plain = HFManager(
            local_dir=args.out / "plain-outputs", checkpoint_dir=args.out / "plain-ckpt"
        )
        try:
            plain.load_latest_checkpoint(model, optimizer)
        except DistributedError as err:
            write_result(args.out, "fsdp-plain", {"error": str(err), "ranks": err.ranks})
        plain.load_latest_checkpoint(model)
        plain_state = full_model_state(model)
        if rank == 0:
            torch.save(plain_state, args.out / "plain-into-fsdp.pt")
    manager = HFManager(local_dir=args.out / "outputs", checkpoint_dir=args.out / "ckpt",
                        model=model, optimizer=optimizer, scheduler=scheduler)
    if args.phase == "save":
        failing_shard_write(manager, rank, args.out)
        manager.save_checkpoint(step=3, metrics={"loss": 1.0})
        manager.save_final_model(format="safetensors")
    else:
        manager.load_latest_checkpoint()
    state = full_model_state(model)
    # One more step from the checkpoint's state: equal only if the optimizer and scheduler
    # state came back too.
    seed_rank(8, rank)
    train(model, optimizer, scheduler, 1)
    after_step = full_model_state(model)
    if rank == 0:
        torch.save(state, args.out / f"full-{args.phase}.pt")
        torch.save(after_step, args.out / f"after-step-{args.phase}.pt")
    manager.close()


def metrics(args) -> None:
    """Ranks report opposite metric trends for the same steps; retention must follow rank 0."""
    rank = dist.get_rank()
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
    model, optimizer, scheduler = build_ddp()
    seed_rank(4, rank)
    manager = HFManager(
        local_dir=args.out / "outputs", checkpoint_dir=args.out / "ckpt",
        retention_policy=KeepLastN(1) | KeepBestM(1, metric="val_loss", mode="min"),
        model=model, optimizer=optimizer, scheduler=scheduler,
    )
    listings = []
    for index, step in enumerate(range(1, 5)):
        train(model, optimizer, scheduler, 1)
        # Rank 0 improves at every save (keep only the last); rank 1 gets worse (keep the first).
        val_loss = 4.0 - index if rank == 0 else 1.0 + index
        manager.save_checkpoint(step=step, metrics={"val_loss": val_loss})
        listings.append(names(manager))
    # Every rank loads, and logs that at INFO unless it is quieted.
    manager.load_latest_checkpoint()
    manager.close()
    write_result(args.out, "metrics", {"listings": listings})
    # A manager used by rank 0 alone, as the Trainer callback uses it, must not wait for rank 1.
    if rank == 0:
        solo = HFManager(local_dir=args.out / "solo-outputs",
                         checkpoint_dir=args.out / "solo-ckpt", distributed=False)
        solo.save_checkpoint(model, optimizer, step=4)
        solo.close()


def failure(args) -> None:
    """A save fails on one rank, then on rank 0 while writing, then rank 0 dies mid-save."""
    rank = dist.get_rank()
    model, optimizer, scheduler = build_ddp()
    seed_rank(6, rank)
    manager = HFManager(local_dir=args.out / "outputs", checkpoint_dir=args.out / "ckpt",
                        model=model, optimizer=optimizer, scheduler=scheduler)
    train(model, optimizer, scheduler, 2)
    manager.save_checkpoint(step=2)
    result: dict = {}

    # A custom state that JSON and safetensors cannot hold, on rank 1 only.
    train(model, optimizer, scheduler, 2)
    custom = {"position": object() if rank == 1 else 4}
    started = time.monotonic()
    try:
        manager.save_checkpoint(step=4, custom_state=custom)
    except DistributedError as err:
        result["serialize"] = {"ranks": err.ranks, "seconds": time.monotonic() - started,
                               "message": str(err)}
    result["after_serialize"] = names(manager)
    result["temp_after_serialize"] = sorted(p.name for p in manager.checkpoint_dir.glob(".tmp-*"))

    # Writing fails on rank 0, after the temporary folder exists.
    import hf_lifecycle.manager as manager_module

    real_write_state = manager_module.write_state

    def failing_write_state(pending, state):
        raise OSError(28, "No space left on device (injected)", str(pending.temp_dir))

    if rank == 0:
        manager_module.write_state = failing_write_state
    started = time.monotonic()
    try:
        manager.save_checkpoint(step=5)
    except DistributedError as err:
        result["write"] = {"ranks": err.ranks, "seconds": time.monotonic() - started,
                           "message": str(err)}
    manager_module.write_state = real_write_state
    result["after_write"] = names(manager)
    result["temp_after_write"] = sorted(p.name for p in manager.checkpoint_dir.glob(".tmp-*"))

    # A damaged newest checkpoint is skipped by every rank alike.
    path = Path(manager.save_checkpoint(step=7)) / "model.safetensors"
    if rank == 0:
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    dist.barrier()
    result["loaded_after_damage"] = manager.load_latest_checkpoint()["name"]
    write_result(args.out, "failure", result)
    dist.barrier()

    # Rank 0 dies between filling the temporary folder and committing it.
    def dying_write_state(pending, state):
        components = real_write_state(pending, state)
        os.kill(os.getpid(), signal.SIGKILL)
        return components

    if rank == 0:
        manager_module.write_state = dying_write_state
    manager.save_checkpoint(step=6)
    sys.exit("the save after the kill must not return")


def absent(args) -> None:
    """Rank 1 never creates its manager; rank 0's constructor must name it once the short
    process group timeout set in main() runs out."""
    if dist.get_rank() == 1:
        time.sleep(ABSENT_SLEEP.total_seconds())
        return
    started = time.monotonic()
    try:
        HFManager(local_dir=args.out / "outputs", checkpoint_dir=args.out / "ckpt")
    except DistributedError as err:
        write_result(args.out, "absent", {"ranks": err.ranks, "message": str(err),
                                          "seconds": time.monotonic() - started})


SCENARIOS = {"ddp_hub": ddp_hub, "ddp_resume": ddp_resume, "fsdp": fsdp, "metrics": metrics,
             "failure": failure, "absent": absent}
# The "absent" scenario waits for one timeout, so it gets a short one.
ABSENT_TIMEOUT = datetime.timedelta(seconds=4)
ABSENT_SLEEP = datetime.timedelta(seconds=8)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("out", type=Path)
    parser.add_argument("--repo-id")
    parser.add_argument("--phase", default="")
    args = parser.parse_args()
    timeout = ABSENT_TIMEOUT if args.scenario == "absent" else PROCESS_GROUP_TIMEOUT
    dist.init_process_group("gloo", timeout=timeout)
    SCENARIOS[args.scenario](args)
    # Every rank finishes its collectives before any rank tears its process group down. The
    # "absent" scenario's group is broken by its timeout, so a barrier there would only fail.
    if args.scenario != "absent":
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
