"""Command line entry point: ``hf-lifecycle``."""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import click
import typer
from huggingface_hub import constants

from hf_lifecycle._cli_support import (
    folder_size,
    format_metrics,
    format_size,
    format_table,
    one_line,
    policy_from_options,
    policy_from_repr,
    read_tensor_header,
    to_json,
)
from hf_lifecycle.checkpoint.store import CheckpointStore
from hf_lifecycle.errors import CheckpointCorruptedError, ConfigurationError
from hf_lifecycle.manager import METADATA_FILENAME, HFManager
from hf_lifecycle.retention import KeepAll, RetentionPolicy, explain, plan_retention
from hf_lifecycle.tracking import ExperimentTracker, format_summary, read_metadata

logger = logging.getLogger(__name__)

app = typer.Typer(
    name="hf-lifecycle",
    help="Checkpoints, retention and Hugging Face Hub sync for PyTorch training runs.",
    no_args_is_help=True,
    add_completion=False,
    # Markdown joins the wrapped lines of a docstring paragraph in --help output.
    rich_markup_mode="markdown",
)
hub_app = typer.Typer(
    help="Work with a local Hugging Face Hub-compatible server.",
    no_args_is_help=True,
)
app.add_typer(hub_app, name="hub")


def _parse_tokens(values: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for value in values:
        token, separator, user = value.rpartition("=")
        if not separator or not token or not user:
            # The value is not echoed back, since it may contain a token.
            raise typer.BadParameter(
                "expected TOKEN=USER, such as hf_local_token=alice.", param_hint="'--token'"
            )
        pairs.append((token, user))
    return pairs


@hub_app.command("serve")
def serve(
    port: Annotated[
        int, typer.Option(help="TCP port to listen on. 0 picks a free port.", min=0, max=65535)
    ] = 8008,
    path: Annotated[
        Path, typer.Option(help="Folder that stores the repositories, created if missing.")
    ] = Path("hub"),
    host: Annotated[
        str,
        typer.Option(
            help="Address to bind. Any address other than loopback exposes public repositories."
        ),
    ] = "127.0.0.1",
    token: Annotated[
        list[str] | None,
        typer.Option(
            "--token",
            metavar="TOKEN=USER",
            help="Accept TOKEN as user USER (repeatable). Use local test tokens only: the "
            "command line is visible to other processes.",
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", help="Log every request.")] = False,
) -> None:
    """Serve the repositories under PATH over the Hugging Face Hub HTTP API until interrupted."""
    from hf_lifecycle.errors import ConfigurationError
    from hf_lifecycle.hub.server import LocalHub

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    users = _parse_tokens(token or [])
    try:
        hub = LocalHub(path, host=host, port=port)
        for secret, user in users:
            hub.add_user(user, token=secret)
        hub.start()
    except (ConfigurationError, OSError) as err:
        typer.echo(f"Cannot start the local Hub: {err}", err=True)
        raise typer.Exit(code=1) from err

    stop = threading.Event()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signal_number, lambda *_: stop.set())
    typer.echo(f"Local Hub serving {hub.endpoint} from {path.resolve()}")
    typer.echo(f"Users: {', '.join(sorted({user for _, user in users})) or 'none (read-only)'}")
    typer.echo("Point the client at it with:")
    typer.echo(f"  export HF_ENDPOINT={hub.endpoint} HF_HUB_DISABLE_XET=1")
    try:
        stop.wait()
    finally:
        hub.stop()
        typer.echo("Local Hub stopped.")


# Inspecting and managing a run ------------------------------------------------------------

CommandFunction = TypeVar("CommandFunction", bound=Callable[..., Any])

CheckpointDirOption = Annotated[
    Path, typer.Option("--checkpoint-dir", help="Folder that contains the run's checkpoints.")
]
LocalDirOption = Annotated[
    Path,
    typer.Option(
        "--local-dir",
        help=f"Folder that contains the run's {METADATA_FILENAME} and TensorBoard runs.",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of text.")]
KeepLastOption = Annotated[
    int | None, typer.Option("--keep-last", min=1, help="Keep the N newest checkpoints.")
]
KeepBestOption = Annotated[
    int | None,
    typer.Option("--keep-best", min=1, help="Keep the M checkpoints with the best --metric."),
]
MetricOption = Annotated[
    str | None, typer.Option("--metric", help="Metric that ranks checkpoints for --keep-best.")
]
ModeOption = Annotated[
    Literal["min", "max"] | None,
    typer.Option(
        "--mode",
        help="Whether lower (min) or higher (max) --metric is better. Guessed from the name when "
        "omitted: accuracy-like names are max, others min.",
    ),
]


def _reports_errors(command: CommandFunction) -> CommandFunction:
    """Turn an exception into one ``Error:`` line on stderr and exit status 1, with no traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
        try:
            return command(*args, **kwargs)
        # typer's own Exit does not derive from click's in every typer release (0.29 included).
        except (typer.Exit, click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except BrokenPipeError:
            # The reader (`| head`, for example) stopped reading, so there is nothing to report.
            # stdout goes to devnull so that flushing it at exit raises nothing more.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise typer.Exit(code=1) from None
        except Exception as err:  # noqa: BLE001 - every failure ends as one line
            logger.debug("Command failed", exc_info=True)
            typer.echo(f"Error: {one_line(err)}", err=True)
            raise typer.Exit(code=1) from None

    return wrapper  # type: ignore[return-value]


def _open_store(checkpoint_dir: Path, *, clean_leftovers: bool = False) -> CheckpointStore:
    root = checkpoint_dir.expanduser().resolve()
    if not root.is_dir():
        raise ConfigurationError(
            f"Checkpoint folder {root} does not exist; pass --checkpoint-dir with the folder the "
            f"run saved into."
        )
    return CheckpointStore(root, clean_leftovers=clean_leftovers)


def _read_run_metadata(local_dir: Path) -> dict[str, Any]:
    path = local_dir.expanduser().resolve() / METADATA_FILENAME
    if not path.is_file():
        raise ConfigurationError(
            f"No {METADATA_FILENAME} in {path.parent}; pass --local-dir with the folder the run "
            f"wrote its metadata to."
        )
    return read_metadata(path)


def _recorded_policy(local_dir: Path, store: CheckpointStore) -> RetentionPolicy | None:
    """Return the run's policy from its metadata file, when that file describes this folder."""
    path = local_dir.expanduser().resolve() / METADATA_FILENAME
    if not path.is_file():
        return None
    try:
        run = read_metadata(path).get("run") or {}
    except (ConfigurationError, OSError) as err:
        logger.warning("Ignoring the retention policy in %s: %s", path, err)
        return None
    recorded_dir = run.get("checkpoint_dir")
    if not isinstance(recorded_dir, str) or Path(recorded_dir).resolve() != store.root:
        return None
    return policy_from_repr(run.get("retention_policy"))


@app.command("list")
@_reports_errors
def list_command(
    checkpoint_dir: CheckpointDirOption = Path("checkpoints"),
    local_dir: LocalDirOption = Path("outputs"),
    keep_last: KeepLastOption = None,
    keep_best: KeepBestOption = None,
    metric: MetricOption = None,
    mode: ModeOption = None,
    as_json: JsonOption = False,
) -> None:
    """List checkpoints, newest first, with step, epoch, metrics, size and the policy keeping each.

    The policy comes from --keep-last/--keep-best, else from the run's metadata file; the
    KEPT BY column shows "n/a" when neither describes one, and "delete" for a checkpoint the
    policy would delete at the next cleanup.
    """
    store = _open_store(checkpoint_dir)
    policy = policy_from_options(keep_last, keep_best, metric, mode)
    source = "options"
    if policy is None:
        policy = _recorded_policy(local_dir, store)
        source = "metadata"
    checkpoints = store.list()
    reasons = explain(policy, checkpoints) if policy is not None else None
    entries = []
    for info in reversed(checkpoints):
        entry = info.to_dict()
        entry["size"] = folder_size(info.path)
        entry["kept_by"] = None if reasons is None else reasons.get(info.name, [])
        entries.append(entry)
    description = policy.describe() if policy is not None else None
    if as_json:
        payload = {
            "checkpoint_dir": str(store.root),
            "policy": description,
            "policy_source": source if policy is not None else None,
            "checkpoints": entries,
        }
        typer.echo(to_json(payload))
        return
    typer.echo(f"Checkpoints in {store.root}")
    typer.echo(f"Policy: {description} (from {source})" if policy is not None else "Policy: n/a")
    if not entries:
        typer.echo("No checkpoints.")
        return
    rows = [
        (
            entry["name"],
            entry["step"],
            entry["epoch"],
            format_metrics(entry["metrics"]),
            format_size(entry["size"]),
            "n/a" if entry["kept_by"] is None else ", ".join(entry["kept_by"]) or "delete",
        )
        for entry in entries
    ]
    typer.echo(format_table(("NAME", "STEP", "EPOCH", "METRICS", "SIZE", "KEPT BY"), rows))


@app.command("show")
@_reports_errors
def show_command(
    name: Annotated[str, typer.Argument(help="Name of the checkpoint folder.")],
    checkpoint_dir: CheckpointDirOption = Path("checkpoints"),
    as_json: JsonOption = False,
) -> None:
    """Show one checkpoint's manifest and its tensors' names, dtypes and shapes.

    Tensors are read from the safetensors headers only; no tensor data is loaded.
    """
    store = _open_store(checkpoint_dir)
    info = store.get(name)
    manifest = store.read_manifest(name)
    folder = Path(info.path)
    tensors = {
        relative: read_tensor_header(folder / relative)
        for relative in sorted(manifest["files"])
        if relative.endswith(".safetensors")
    }
    aliases = ((manifest.get("components") or {}).get("model") or {}).get("aliases") or {}
    if as_json:
        payload = {"path": info.path, "size": folder_size(folder), "manifest": manifest}
        payload.update(tensors=tensors, aliases=aliases)
        typer.echo(to_json(payload))
        return
    typer.echo(f"Checkpoint {info.name}")
    fields = ("sequence", "step", "epoch", "created_at", "library_version", "torch_version")
    typer.echo(f"  path: {info.path}")
    for field in fields:
        typer.echo(f"  {field}: {'-' if manifest.get(field) is None else manifest[field]}")
    typer.echo(f"  metrics: {format_metrics(manifest.get('metrics'))}")
    typer.echo(f"  size: {format_size(folder_size(folder))}")
    typer.echo("")
    typer.echo("Files")
    file_rows = [
        (
            relative,
            format_size(int(record["size"])),
            f"{record.get('algorithm')}:{record['checksum']}",
        )
        for relative, record in sorted(manifest["files"].items())
    ]
    typer.echo(format_table(("FILE", "SIZE", "CHECKSUM"), file_rows))
    for relative, entries in tensors.items():
        typer.echo("")
        typer.echo(f"Tensors in {relative}")
        rows = [(entry["name"], entry["dtype"], list(entry["shape"])) for entry in entries]
        typer.echo(format_table(("NAME", "DTYPE", "SHAPE"), rows) if rows else "  none")
    if aliases:
        typer.echo("")
        typer.echo("Tied weights (stored once)")
        typer.echo(format_table(("NAME", "SAME AS"), sorted(aliases.items())))


def _verify_one(store: CheckpointStore, name: str) -> list[str]:
    try:
        return store.verify(name)
    except CheckpointCorruptedError as err:
        return [err.file or err.path or name]


def _unlisted_folders(store: CheckpointStore, listed: set[str]) -> list[str]:
    """Folders in the checkpoint folder that listing skipped because their manifest is bad."""
    return sorted(
        entry.name
        for entry in store.root.iterdir()
        if entry.is_dir() and not entry.name.startswith(".") and entry.name not in listed
    )


@app.command("verify")
@_reports_errors
def verify_command(
    name: Annotated[
        str | None, typer.Argument(help="Checkpoint to check; every checkpoint when omitted.")
    ] = None,
    checkpoint_dir: CheckpointDirOption = Path("checkpoints"),
    as_json: JsonOption = False,
) -> None:
    """Check every file of one or all checkpoints against the checksums in its manifest.

    Exits with status 1 and names each bad file when any check fails.
    """
    store = _open_store(checkpoint_dir)
    if name is not None:
        store.get(name)
        names = [name]
    else:
        listed = [info.name for info in reversed(store.list())]
        names = listed + _unlisted_folders(store, set(listed))
    results = [{"name": item, "bad_files": _verify_one(store, item)} for item in names]
    for result in results:
        result["ok"] = not result["bad_files"]
    failed = [result for result in results if not result["ok"]]
    if as_json:
        typer.echo(to_json({"ok": not failed, "checkpoints": results}))
    else:
        for result in results:
            if result["ok"]:
                typer.echo(f"ok      {result['name']}")
            else:
                typer.echo(f"FAILED  {result['name']}: {', '.join(result['bad_files'])}")
        if not results:
            typer.echo(f"No checkpoints in {store.root}.")
    if failed:
        bad_files = [path for result in failed for path in result["bad_files"]]
        typer.echo(
            f"Error: {len(failed)} of {len(results)} checkpoints failed verification: "
            f"{', '.join(bad_files)}",
            err=True,
        )
        raise typer.Exit(code=1)


@app.command("cleanup")
@_reports_errors
def cleanup_command(
    keep_last: KeepLastOption = None,
    keep_best: KeepBestOption = None,
    metric: MetricOption = None,
    mode: ModeOption = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print what would be deleted and delete nothing.")
    ] = False,
    checkpoint_dir: CheckpointDirOption = Path("checkpoints"),
    as_json: JsonOption = False,
) -> None:
    """Delete the checkpoints that a retention policy does not keep.

    A checkpoint survives when --keep-last or --keep-best keeps it. The newest checkpoint is
    never deleted, and nothing outside the checkpoint folder is touched. Do not run this while
    a training run saves into the same folder with another policy.
    """
    policy = policy_from_options(keep_last, keep_best, metric, mode)
    if policy is None:
        raise ConfigurationError(
            "cleanup needs a policy: pass --keep-last N, --keep-best M --metric NAME, or both."
        )
    store = _open_store(checkpoint_dir, clean_leftovers=not dry_run)
    plan = plan_retention(policy, store.list())
    deleted = plan.delete if dry_run else store.delete(plan.delete)
    if as_json:
        payload = {"dry_run": dry_run, "policy": policy.describe(), "delete": deleted}
        payload["keep"] = plan.keep
        typer.echo(to_json(payload))
        return
    typer.echo(f"Policy: {policy.describe()}")
    verb = "Would delete" if dry_run else "Deleted"
    typer.echo(f"{verb} {len(deleted)}: {', '.join(deleted) or 'none'}")
    typer.echo(f"Kept {len(plan.keep)}: {', '.join(reversed(plan.keep)) or 'none'}")


@app.command("summary")
@_reports_errors
def summary_command(
    local_dir: LocalDirOption = Path("outputs"),
    checkpoint_dir: Annotated[
        Path | None,
        typer.Option(
            "--checkpoint-dir",
            help="Folder of the run's checkpoints. When omitted, the checkpoints recorded in the "
            "metadata file are listed.",
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Print the run's summary (what HFManager.get_summary prints) from its metadata file."""
    metadata = _read_run_metadata(local_dir)
    tracker = ExperimentTracker.from_dict(metadata)
    if checkpoint_dir is not None:
        checkpoints = _open_store(checkpoint_dir).list()
        checkpoint_dicts = [info.to_dict() for info in reversed(checkpoints)]
    else:
        checkpoint_dicts = list(metadata.get("checkpoints") or [])
    run = dict(metadata.get("run") or {})
    final_model = metadata.get("final_model")
    if as_json:
        payload = {"run": run, "hyperparameters": tracker.hyperparameters}
        payload.update(last_metrics=tracker.last(), best_metrics=tracker.best())
        payload.update(checkpoints=checkpoint_dicts, final_model=final_model)
        typer.echo(to_json(payload))
        return
    text = format_summary(tracker, run=run, checkpoints=checkpoint_dicts, final_model=final_model)
    typer.echo(text, nl=False)


@app.command("plot")
@_reports_errors
def plot_command(
    local_dir: LocalDirOption = Path("outputs"),
    output: Annotated[
        Path, typer.Option("--output", help="PNG file to write, replaced if it exists.")
    ] = Path("metrics.png"),
    metric: Annotated[
        list[str] | None,
        typer.Option("--metric", help="Metric to draw (repeatable). All metrics when omitted."),
    ] = None,
) -> None:
    """Draw the logged metric curves (value against step) into a PNG file."""
    tracker = ExperimentTracker.from_dict(_read_run_metadata(local_dir))
    if not tracker.metric_names:
        raise ConfigurationError(f"The run in {local_dir.resolve()} logged no metrics to plot.")
    written = tracker.plot(output, names=metric or None)
    if written is None:
        raise ConfigurationError(
            'Plotting needs matplotlib. Install it with: pip install "hf-lifecycle[plot]"'
        )
    typer.echo(f"Wrote {written}")


def _hub_manager(
    repo_id: str,
    local_dir: Path,
    checkpoint_dir: Path,
    *,
    private: bool = False,
    policy: RetentionPolicy | None = None,
) -> HFManager:
    # KeepAll unless the run's own policy is known: a command never deletes a checkpoint that
    # the training run would keep. The policy also goes into the metadata that push uploads.
    return HFManager(
        repo_id=repo_id,
        local_dir=local_dir,
        checkpoint_dir=checkpoint_dir,
        private=private,
        retention_policy=policy if policy is not None else KeepAll(),
    )


RepoIdOption = Annotated[
    str, typer.Option("--repo-id", help="Hub repository, as namespace/name.", show_default=False)
]


@app.command("push")
@_reports_errors
def push_command(
    repo_id: RepoIdOption,
    final_model: Annotated[
        bool, typer.Option("--final-model", help="Also upload the final model saved by the run.")
    ] = False,
    local_dir: LocalDirOption = Path("outputs"),
    checkpoint_dir: CheckpointDirOption = Path("checkpoints"),
    private: Annotated[
        bool, typer.Option("--private", help="Create the repository as private if it is new.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Upload the checkpoints, metadata, TensorBoard runs and model card in one commit.

    The token comes from HF_TOKEN or `hf auth login`. Unchanged files are skipped.
    Progress bars come from huggingface_hub; HF_HUB_DISABLE_PROGRESS_BARS=1 hides them.
    """
    store = _open_store(checkpoint_dir)
    if not local_dir.expanduser().is_dir():
        raise ConfigurationError(
            f"Local folder {local_dir.expanduser().resolve()} does not exist; pass --local-dir "
            f"with the folder the run wrote its metadata to."
        )
    policy = _recorded_policy(local_dir, store)
    manager = _hub_manager(repo_id, local_dir, store.root, private=private, policy=policy)
    with manager:
        manager.push(push_final_model=final_model)
    names = [info.name for info in reversed(store.list())]
    url = f"{constants.ENDPOINT.rstrip('/')}/{repo_id}"
    if as_json:
        payload = {"repo_id": repo_id, "url": url, "checkpoints": names, "final_model": final_model}
        typer.echo(to_json(payload))
        return
    extra = " and the final model" if final_model else ""
    typer.echo(f"Pushed {len(names)} checkpoints, metadata{extra} to {url}")


@app.command("pull")
@_reports_errors
def pull_command(
    repo_id: RepoIdOption,
    name: Annotated[
        str | None, typer.Argument(help="Checkpoint to download; the Hub's latest when omitted.")
    ] = None,
    checkpoint_dir: CheckpointDirOption = Path("checkpoints"),
    as_json: JsonOption = False,
) -> None:
    """Download one checkpoint from the Hub into the checkpoint folder, verified, not loaded.

    A checkpoint already in the folder under that name is kept as it is.
    """
    root = checkpoint_dir.expanduser().resolve()
    # The manager needs a local folder; pulling writes nothing there, so it shares root.
    manager = _hub_manager(repo_id, root, root)
    with manager:
        entry = manager.pull_checkpoint(name)
    if entry is None:
        raise ConfigurationError(f"Hub repository {repo_id} has no checkpoint to pull.")
    if as_json:
        typer.echo(to_json(entry))
        return
    typer.echo(f"Checkpoint {entry['name']} (step {entry['step']}) is in {entry['path']}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
