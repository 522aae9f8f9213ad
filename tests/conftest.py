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
