"""Save checkpoints with auto_push, then exit without close(), for the interpreter-exit tests.

    push_at_exit.py REPO_ID CHECKPOINT_DIR LOCAL_DIR COUNT

The Hub endpoint and token come from HF_ENDPOINT and HF_TOKEN. The pushes are still queued
when the script ends, so only the manager's exit hook can upload them or report them lost.
"""

from __future__ import annotations

import sys

import torch

from hf_lifecycle import HFManager


def main(repo_id: str, checkpoint_dir: str, local_dir: str, count: int) -> None:
    manager = HFManager(
        repo_id,
        local_dir=local_dir,
        checkpoint_dir=checkpoint_dir,
        auto_push=True,
        push_retries=1,
        push_retry_wait=0.05,
    )
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(1, count + 1):
        manager.save_checkpoint(model, optimizer, step=step)
        print(f"saved checkpoint-step-{step}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
