"""Last phase of the digits job: final model, test accuracy, summary and artifact list."""

from __future__ import annotations

import argparse
from pathlib import Path

from digits_common import DigitsConfig, evaluate, load_splits, make_model


def finish(args: argparse.Namespace) -> None:
    from hf_lifecycle import HFManager, KeepBestM, KeepLastN, load_model_weights

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
    loaded = manager.load_latest_checkpoint()
    if loaded is None:
        raise SystemExit(f"No checkpoint in {manager.checkpoint_dir}; run the training first.")
    test_loss, test_accuracy = evaluate(model, splits.x_test, splits.y_test)
    manager.log_metrics({"test_loss": test_loss, "test_accuracy": test_accuracy}, step=loaded["step"])
    final_dir = manager.save_final_model(format="safetensors", config=config.to_dict())

    # Reload the saved weights into a fresh model: the accuracy must not move.
    fresh, _, _ = make_model(config, steps_per_epoch=splits.steps_per_epoch(config))
    load_model_weights(fresh, final_dir)
    _, reloaded_accuracy = evaluate(fresh, splits.x_test, splits.y_test)
    if reloaded_accuracy != test_accuracy:
        raise SystemExit(f"Reloaded accuracy {reloaded_accuracy} differs from {test_accuracy}.")

    manager.save_metadata()
    print()
    print(manager.get_summary())
    print()
    print(f"Test accuracy: {test_accuracy:.4f} (test loss {test_loss:.4f}); "
          f"the reloaded final model gives {reloaded_accuracy:.4f}")
    print("Artifacts:")
    print(f"  checkpoints:        {manager.checkpoint_dir}")
    for entry in manager.list_checkpoints():
        print(f"    {entry['name']}")
    print(f"  final model:        {final_dir}")
    for path in sorted(Path(final_dir).iterdir()):
        print(f"    {path.name}")
    print(f"  metadata:           {manager.local_dir / 'experiment_metadata.json'}")
