"""Last phase of the digits job: final model, Hub push, Auto-class registration, summary.

By default everything is pushed to a Hub-compatible server started in this
process on 127.0.0.1 (``hf_lifecycle.hub.server.LocalHub``), because the real
Hub is not reachable from every machine. With ``--repo-id`` and a token
(``HF_TOKEN`` or ``hf auth login``) the same code pushes to the real Hub.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

LOCAL_USER = "demo"
# A token for the in-process server only; it grants nothing anywhere else.
LOCAL_TOKEN = "hf_local_demo_token"


@contextlib.contextmanager
def hub_for(args: argparse.Namespace):
    """Yield (repo_id, description), starting a local Hub when no real repository was given."""
    if args.repo_id:
        yield args.repo_id, "the Hugging Face Hub"
        return
    from hf_lifecycle.hub.server import LocalHub

    with LocalHub(args.run_dir / "local_hub") as hub:
        hub.add_user(LOCAL_USER, token=LOCAL_TOKEN)
        # huggingface_hub reads these when it is first imported, which happens after this point.
        os.environ.update(
            HF_ENDPOINT=hub.endpoint,
            HF_TOKEN=LOCAL_TOKEN,
            HF_HOME=str(args.run_dir / "hf_home"),
            HF_HUB_DISABLE_XET="1",
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
        )
        yield f"{LOCAL_USER}/digits-mlp", f"a local Hub server at {hub.endpoint} (in-process)"


def finish(args: argparse.Namespace) -> None:
    with hub_for(args) as (repo_id, where):
        print(f"Pushing to {where}")
        _finish(args, repo_id)


def _finish(args: argparse.Namespace, repo_id: str) -> None:
    from digits_common import DigitsConfig, evaluate, load_splits, make_model

    from hf_lifecycle import HFManager, KeepBestM, KeepLastN, load_model_weights

    config = DigitsConfig(epochs=args.epochs)
    splits = load_splits(config.seed)
    model, optimizer, scheduler = make_model(config, steps_per_epoch=splits.steps_per_epoch(config))
    manager = HFManager(
        repo_id=repo_id,
        local_dir=args.run_dir / "outputs",
        checkpoint_dir=args.run_dir / "checkpoints",
        retention_policy=KeepLastN(2) | KeepBestM(1, metric="val_loss", mode="min"),
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
    )
    with manager:
        loaded = manager.load_latest_checkpoint()
        if loaded is None:
            raise SystemExit(f"No checkpoint in {manager.checkpoint_dir}; run the training first.")
        test_loss, test_accuracy = evaluate(model, splits.x_test, splits.y_test)
        manager.log_metrics({"test_loss": test_loss, "test_accuracy": test_accuracy},
                            step=loaded["step"])
        final_dir = manager.save_final_model(format="safetensors", config=config.to_dict())

        # Reload the saved weights into a fresh model: the accuracy must not move.
        fresh, _, _ = make_model(config, steps_per_epoch=splits.steps_per_epoch(config))
        load_model_weights(fresh, final_dir)
        _, reloaded_accuracy = evaluate(fresh, splits.x_test, splits.y_test)
        if reloaded_accuracy != test_accuracy:
            raise SystemExit(f"Reloaded accuracy {reloaded_accuracy} differs from {test_accuracy}.")

        manager.push(push_final_model=True, commit_message="Digits MLP: checkpoints and final model")
        print(f"Pushed checkpoints, metadata, model card and final model to {manager.repo_url}")
        auto_accuracy = register_and_reload(manager, model, config, splits, repo_id)

    print()
    print(manager.get_summary())
    print()
    print(f"Test accuracy: {test_accuracy:.4f} (test loss {test_loss:.4f}); final model reloaded "
          f"from disk: {reloaded_accuracy:.4f}; through AutoModel: {auto_accuracy:.4f}")
    print("Artifacts:")
    print(f"  checkpoints:        {manager.checkpoint_dir}")
    for entry in manager.list_checkpoints():
        print(f"    {entry['name']}")
    print(f"  final model:        {final_dir}")
    for path in sorted(Path(final_dir).iterdir()):
        print(f"    {path.name}")
    print(f"    (also linked into {manager.local_dir}, so from_pretrained loads either folder)")
    print(f"  metadata:           {manager.local_dir / 'experiment_metadata.json'}")
    print(f"  model card:         {manager.local_dir / 'README.md'}")
    print(f"  metric curves:      {manager.local_dir / 'metrics.png'}")
    print(f"  TensorBoard events: {manager.local_dir / 'runs'}")
    print(f"  custom model:       {manager.local_dir / 'custom_models' / 'digits-mlp'}")
    print(f"  Hub repositories:   {manager.repo_url} and {manager.repo_url}-custom")
    if not args.repo_id:
        print(f"    (the local server stopped with this script; to browse them again run "
              f"`.venv/bin/hf-lifecycle hub serve --path {args.run_dir / 'local_hub'}`)")


def register_and_reload(manager, model, config, splits, repo_id: str) -> float:
    """Register the architecture with the Auto classes, push it, reload it through AutoModel."""
    from digits_common import evaluate

    custom_repo = f"{repo_id}-custom"
    url = manager.register_custom_model(
        model=model,
        config=dict(input_size=model.input_size, hidden_size=model.hidden_size,
                    num_classes=model.num_classes, dropout=model.dropout),
        repo_id=custom_repo,
        model_name="digits-mlp",
        description="A two-layer perceptron trained on scikit-learn's 8x8 digits with hf-lifecycle.",
        push_to_hub=True,
    )
    print(f"Registered the architecture as model type 'digits-mlp' and pushed it to {url}")
    from transformers import AutoModel

    auto_model = AutoModel.from_pretrained(custom_repo, trust_remote_code=True)
    _, accuracy = evaluate(auto_model, splits.x_test, splits.y_test)
    return accuracy
