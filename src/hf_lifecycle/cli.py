"""Command line entry point: ``hf-lifecycle``."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="hf-lifecycle",
    help="Checkpoints, retention and Hugging Face Hub sync for PyTorch training runs.",
    no_args_is_help=True,
    add_completion=False,
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
