"""Test-wide isolation: every cache, home and token path points at a temporary folder.

The Hugging Face variables are set here, at import time, before any test module
imports huggingface_hub, because the client reads several of them only once.
"""

from __future__ import annotations

import os
import tempfile

_SANDBOX = tempfile.mkdtemp(prefix="hf-lifecycle-tests-")
os.environ["HF_HOME"] = os.path.join(_SANDBOX, "hf_home")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["HF_HUB_OFFLINE"] = "0"
# Until a test starts the local Hub, the endpoint points at a closed loopback port,
# so a stray call fails at once instead of leaving the machine.
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
os.environ["HF_TOKEN"] = "hf_test_token_not_secret_0000"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("HF_HUB_CACHE", None)

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path, monkeypatch):
    """Run every test in its own empty folder, so default paths such as ./checkpoints stay apart."""
    monkeypatch.chdir(tmp_path)
    yield


INTRUDER_TOKEN = "hf_intruder_token_0000"


def _point_client_at(endpoint: str) -> None:
    """Point huggingface_hub (and transformers, once imported) at ``endpoint``."""
    import sys

    import huggingface_hub
    import huggingface_hub.hf_api  # Not imported by `import huggingface_hub` alone.
    from huggingface_hub import constants

    os.environ["HF_ENDPOINT"] = endpoint
    constants.ENDPOINT = endpoint
    constants.HUGGINGFACE_CO_URL_TEMPLATE = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    # Module-level helpers such as huggingface_hub.upload_file use an HfApi built at import.
    huggingface_hub.hf_api.api.endpoint = endpoint
    if "transformers.utils.hub" in sys.modules:
        # transformers keeps one HfApi, built with the endpoint of its first use.
        sys.modules["transformers.utils.hub"]._hf_api = None


@pytest.fixture(scope="session")
def local_hub(tmp_path_factory):
    """A LocalHub for the whole session, with users "tester" (HF_TOKEN) and "intruder"."""
    from huggingface_hub import constants

    from hf_lifecycle.hub.server import LocalHub

    saved = (os.environ["HF_ENDPOINT"], constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE)
    with LocalHub(tmp_path_factory.mktemp("local-hub"), port=0) as server:
        server.add_user("tester", token=os.environ["HF_TOKEN"])
        server.add_user("intruder", token=INTRUDER_TOKEN)
        _point_client_at(server.endpoint)
        try:
            yield server
        finally:
            _point_client_at(saved[0])
            constants.ENDPOINT = saved[1]
            constants.HUGGINGFACE_CO_URL_TEMPLATE = saved[2]


@pytest.fixture
def hub(local_hub):
    """The session's LocalHub with no faults and zeroed stats."""
    local_hub.faults.clear()
    local_hub.stats.reset()
    yield local_hub
    local_hub.faults.clear()


@pytest.fixture
def intruder_token():
    """The token of "intruder", a second user of ``local_hub`` who owns no repositories."""
    return INTRUDER_TOKEN


@pytest.fixture
def repo_id(request):
    """A repository id under "tester/" that no other test uses (the repository is not created)."""
    import re
    import uuid

    name = re.sub(r"[^A-Za-z0-9_]+", "-", request.node.name).strip("-")[:60]
    return f"tester/{name}-{uuid.uuid4().hex[:8]}"
