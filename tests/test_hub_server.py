"""The local Hub server, driven by the real huggingface_hub client over HTTP on 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_session

from hf_lifecycle.errors import ConfigurationError
from hf_lifecycle.hub._server_patterns import GitAttributes, GitIgnore, upload_mode
from hf_lifecycle.hub.server import LocalHub

LFS_SIZE = 11 * 1024 * 1024

# huggingface_hub 2.4.0 passes LFS upload bodies to httpx2 as data=<file>, which httpx2 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


@pytest.fixture
def api(hub):
    return HfApi(endpoint=hub.endpoint)


def _raw_request(hub, method, path, body=b"", headers=None):
    """Send one request with http.client, which keeps the path exactly as written."""
    host, port = hub.endpoint.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def _auth():
    return {"Authorization": f"Bearer {os.environ['HF_TOKEN']}"}


def _write_folder(root: Path, *, big: bytes) -> dict[str, bytes]:
    files = {
        "config.json": b'{"hidden_size": 8}\n',
        "notes/readme.txt": b"small text file\n",
        "weights/big.bin": big,
    }
    for relative, data in files.items():
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return files


# ---------------------------------------------------------------------- repositories


def test_create_repo_conflict_and_exist_ok(hub, api, repo_id):
    url = api.create_repo(repo_id)
    assert url == f"{hub.endpoint}/{repo_id}"
    assert url.repo_id == repo_id

    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_repo(repo_id)
    assert excinfo.value.response.status_code == 409
    assert excinfo.value.response.json()["url"] == f"{hub.endpoint}/{repo_id}"

    assert api.create_repo(repo_id, exist_ok=True) == url
    assert api.repo_exists(repo_id)
    assert api.list_repo_files(repo_id) == [".gitattributes"]


def test_create_repo_default_namespace(api, repo_id):
    name = repo_id.split("/")[1]
    url = api.create_repo(name)
    assert url.repo_id == repo_id


def test_create_repo_foreign_namespace_forbidden(api, repo_id):
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_repo("intruder/" + repo_id.split("/")[1])
    assert excinfo.value.response.status_code == 403


def test_dataset_repo_roundtrip(api, repo_id):
    api.create_repo(repo_id, repo_type="dataset")
    api.upload_file(
        path_or_fileobj=b"a,b\n1,2\n", path_in_repo="data.csv", repo_id=repo_id, repo_type="dataset"
    )
    path = hf_hub_download(repo_id, "data.csv", repo_type="dataset")
    assert Path(path).read_bytes() == b"a,b\n1,2\n"
    assert not api.repo_exists(repo_id)  # the model repository of that id does not exist


def test_delete_repo(api, repo_id):
    api.create_repo(repo_id)
    api.delete_repo(repo_id)
    assert not api.repo_exists(repo_id)
    with pytest.raises(RepositoryNotFoundError):
        api.delete_repo(repo_id)
    api.delete_repo(repo_id, missing_ok=True)


def test_model_info_with_expand(api, repo_id):
    api.create_repo(repo_id)
    api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)
    info = api.model_info(repo_id, expand=["sha", "siblings"])
    assert info.sha == api.repo_info(repo_id).sha
    assert sorted(sibling.rfilename for sibling in info.siblings) == [".gitattributes", "x.txt"]
    assert info.private is None  # not requested, so not returned


def test_xet_token_request_rejected(hub, repo_id):
    status, _, body = _raw_request(hub, "GET", f"/api/models/{repo_id}/xet-write-token/main")
    assert status == 501
    assert "HF_HUB_DISABLE_XET=1" in json.loads(body)["error"]


def test_whoami(api):
    info = api.whoami()
    assert info["name"] == "tester"
    assert info["type"] == "user"


# ---------------------------------------------------------------------- uploads and downloads


def test_upload_file_roundtrip(hub, api, repo_id):
    api.create_repo(repo_id)
    info = api.upload_file(
        path_or_fileobj=b"hello hub\n",
        path_in_repo="greeting.txt",
        repo_id=repo_id,
        commit_message="Add greeting",
    )
    assert info.oid == api.repo_info(repo_id).sha
    assert hub.stats.uploaded_bytes == len(b"hello hub\n")
    assert hub.stats["lfs_upload"] == 0

    path = hf_hub_download(repo_id, "greeting.txt")
    assert Path(path).read_bytes() == b"hello hub\n"
    commits = api.list_repo_commits(repo_id)
    assert [commit.title for commit in commits] == ["Add greeting", "initial commit"]
    assert commits[0].authors == ["tester"]


def test_upload_folder_lfs_roundtrip(hub, api, repo_id, tmp_path):
    api.create_repo(repo_id)
    big = os.urandom(LFS_SIZE)
    files = _write_folder(tmp_path / "src", big=big)
    api.upload_folder(folder_path=tmp_path / "src", repo_id=repo_id)

    assert hub.stats["lfs_upload"] == 1
    assert hub.stats.uploaded_bytes == sum(len(data) for data in files.values())
    entries = {entry.path: entry for entry in api.list_repo_tree(repo_id, recursive=True)}
    assert entries["weights/big.bin"].lfs is not None
    assert entries["weights/big.bin"].lfs.size == LFS_SIZE
    assert entries["weights/big.bin"].size == LFS_SIZE
    assert entries["notes/readme.txt"].lfs is None

    snapshot = Path(snapshot_download(repo_id))
    for relative, data in files.items():
        assert (snapshot / relative).read_bytes() == data, relative
    single = hf_hub_download(repo_id, "weights/big.bin", cache_dir=tmp_path / "other-cache")
    assert Path(single).read_bytes() == big


def test_unchanged_folder_uploads_nothing(hub, api, repo_id, tmp_path):
    api.create_repo(repo_id)
    _write_folder(tmp_path / "src", big=os.urandom(LFS_SIZE))
    api.upload_folder(folder_path=tmp_path / "src", repo_id=repo_id)
    head = api.repo_info(repo_id).sha
    hub.stats.reset()

    info = api.upload_folder(folder_path=tmp_path / "src", repo_id=repo_id)

    assert hub.stats.uploaded_bytes == 0
    assert hub.stats["commit"] == 0
    assert hub.stats["lfs_upload"] == 0
    assert info.oid == head
    assert api.repo_info(repo_id).sha == head


def test_create_commit_adds_and_deletes(api, repo_id):
    api.create_repo(repo_id)
    api.create_commit(
        repo_id,
        operations=[
            CommitOperationAdd("keep.txt", b"keep"),
            CommitOperationAdd("old/a.txt", b"a"),
            CommitOperationAdd("old/b.txt", b"b"),
            CommitOperationAdd("gone.txt", b"gone"),
        ],
        commit_message="Add files",
    )
    api.create_commit(
        repo_id,
        operations=[
            CommitOperationDelete("gone.txt"),
            CommitOperationDelete("old/"),
            CommitOperationAdd("keep.txt", b"changed"),
        ],
        commit_message="Delete files",
    )
    assert sorted(api.list_repo_files(repo_id)) == [".gitattributes", "keep.txt"]
    assert Path(hf_hub_download(repo_id, "keep.txt")).read_bytes() == b"changed"

    with pytest.raises(EntryNotFoundError):
        api.delete_file("missing.txt", repo_id)


def test_download_by_commit_sha(api, repo_id):
    api.create_repo(repo_id)
    first = api.upload_file(path_or_fileobj=b"v1", path_in_repo="f.txt", repo_id=repo_id)
    api.upload_file(path_or_fileobj=b"v2", path_in_repo="f.txt", repo_id=repo_id)

    assert Path(hf_hub_download(repo_id, "f.txt", revision=first.oid)).read_bytes() == b"v1"
    assert Path(hf_hub_download(repo_id, "f.txt")).read_bytes() == b"v2"
    snapshot = Path(snapshot_download(repo_id, revision=first.oid))
    assert snapshot.name == first.oid
    assert (snapshot / "f.txt").read_bytes() == b"v1"


def test_resolve_headers_and_range(hub, api, repo_id):
    api.create_repo(repo_id)
    data = bytes(range(256)) * 4
    api.upload_file(path_or_fileobj=data, path_in_repo="blob.bin", repo_id=repo_id)
    head = api.repo_info(repo_id).sha
    url = f"{hub.endpoint}/{repo_id}/resolve/main/blob.bin"

    response = get_session().head(url, headers=_auth())
    assert response.status_code == 200
    assert response.headers["X-Repo-Commit"] == head
    assert response.headers["Content-Length"] == str(len(data))
    # A NUL byte in the first 512 bytes makes the file LFS, so the ETag is its sha256.
    assert response.headers["X-Linked-Size"] == str(len(data))
    assert response.headers["ETag"].strip('"') == response.headers["X-Linked-Etag"].strip('"')
    assert "Location" not in response.headers

    response = get_session().get(url, headers={**_auth(), "Range": "bytes=10-19"})
    assert response.status_code == 206
    assert response.content == data[10:20]
    assert response.headers["Content-Range"] == f"bytes 10-19/{len(data)}"

    response = get_session().get(url, headers={**_auth(), "Range": "bytes=-5"})
    assert response.content == data[-5:]

    response = get_session().get(url, headers={**_auth(), "Range": f"bytes={len(data)}-"})
    assert response.status_code == 416


def test_upload_modes_follow_hub_rules(api, repo_id):
    api.create_repo(repo_id)
    api.create_commit(
        repo_id,
        operations=[
            CommitOperationAdd("tiny.safetensors", b"not really tensors"),
            CommitOperationAdd("binary.dat", b"ab\x00cd"),
            CommitOperationAdd("text.txt", b"plain"),
        ],
        commit_message="Mixed files",
    )
    entries = {entry.path: entry for entry in api.list_repo_tree(repo_id)}
    assert entries["tiny.safetensors"].lfs is not None
    assert entries["binary.dat"].lfs is not None
    assert entries["text.txt"].lfs is None


def test_gitignore_in_repo_skips_files(api, repo_id, tmp_path):
    api.create_repo(repo_id)
    api.upload_file(
        path_or_fileobj=b"*.log\nscratch/\n", path_in_repo=".gitignore", repo_id=repo_id
    )
    (tmp_path / "scratch").mkdir()
    (tmp_path / "scratch" / "x.txt").write_bytes(b"x")
    (tmp_path / "run.log").write_bytes(b"log")
    (tmp_path / "model.txt").write_bytes(b"model")
    api.upload_folder(folder_path=tmp_path, repo_id=repo_id)
    assert sorted(api.list_repo_files(repo_id)) == [".gitattributes", ".gitignore", "model.txt"]


def test_readme_front_matter_validated(api, repo_id):
    api.create_repo(repo_id)
    api.upload_file(
        path_or_fileobj=b"---\nlicense: mit\n---\n# Model\n",
        path_in_repo="README.md",
        repo_id=repo_id,
    )
    with pytest.raises(ValueError, match="Invalid metadata"):
        api.upload_file(
            path_or_fileobj=b"---\nlicense: mit\n# Model\n",
            path_in_repo="README.md",
            repo_id=repo_id,
        )


# ---------------------------------------------------------------------- listings and errors


def test_tree_paths_info_exists(api, repo_id):
    api.create_repo(repo_id)
    api.create_commit(
        repo_id,
        operations=[
            CommitOperationAdd("top.txt", b"top"),
            CommitOperationAdd("dir/a.txt", b"a"),
            CommitOperationAdd("dir/sub/b.txt", b"b"),
        ],
        commit_message="Tree",
    )
    top = sorted(entry.path for entry in api.list_repo_tree(repo_id))
    assert top == [".gitattributes", "dir", "top.txt"]
    inside = sorted(entry.path for entry in api.list_repo_tree(repo_id, path_in_repo="dir"))
    assert inside == ["dir/a.txt", "dir/sub"]
    everything = sorted(entry.path for entry in api.list_repo_tree(repo_id, recursive=True))
    assert everything == [
        ".gitattributes",
        "dir",
        "dir/a.txt",
        "dir/sub",
        "dir/sub/b.txt",
        "top.txt",
    ]
    expanded = list(api.list_repo_tree(repo_id, expand=True))
    assert all(entry.last_commit is not None for entry in expanded)

    infos = api.get_paths_info(repo_id, ["top.txt", "dir", "missing.txt"])
    assert [info.path for info in infos] == ["top.txt", "dir"]
    assert infos[0].size == 3

    assert api.file_exists(repo_id, "dir/sub/b.txt")
    assert not api.file_exists(repo_id, "dir/nothing.txt")
    assert not api.repo_exists("tester/never-created-repo")
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree(repo_id, path_in_repo="no-such-dir"))


def test_not_found_error_codes(api, repo_id, tmp_path):
    api.create_repo(repo_id)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("tester/never-created-repo", "config.json", cache_dir=tmp_path)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "config.json", cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, ".gitattributes", revision="no-such-branch", cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        api.repo_info(repo_id, revision="f" * 40)
    with pytest.raises(RepositoryNotFoundError):
        api.repo_info("tester/never-created-repo")


def test_branches_refs_and_commits(api, repo_id):
    api.create_repo(repo_id)
    base = api.upload_file(path_or_fileobj=b"main", path_in_repo="f.txt", repo_id=repo_id)
    api.create_branch(repo_id, branch="feature/x")
    api.create_branch(repo_id, branch="feature/x", exist_ok=True)
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_branch(repo_id, branch="feature/x")
    assert excinfo.value.response.status_code == 409

    api.upload_file(
        path_or_fileobj=b"branch", path_in_repo="f.txt", repo_id=repo_id, revision="feature/x"
    )
    path = hf_hub_download(repo_id, "f.txt", revision="feature/x")
    assert Path(path).read_bytes() == b"branch"
    assert Path(hf_hub_download(repo_id, "f.txt")).read_bytes() == b"main"

    api.create_tag(repo_id, tag="v1", revision=base.oid)
    refs = api.list_repo_refs(repo_id)
    assert {ref.name for ref in refs.branches} == {"main", "feature/x"}
    assert [(ref.name, ref.target_commit) for ref in refs.tags] == [("v1", base.oid)]
    assert Path(hf_hub_download(repo_id, "f.txt", revision="v1")).read_bytes() == b"main"

    branch_commits = api.list_repo_commits(repo_id, revision="feature/x")
    assert branch_commits[1].commit_id == base.oid
    assert len(branch_commits) == 3

    with pytest.raises(RevisionNotFoundError):
        api.upload_file(
            path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id, revision=base.oid
        )

    api.delete_branch(repo_id, branch="feature/x")
    assert {ref.name for ref in api.list_repo_refs(repo_id).branches} == {"main"}
    with pytest.raises(RevisionNotFoundError):
        api.delete_branch(repo_id, branch="feature/x")


# ---------------------------------------------------------------------- access control


def test_private_repo_hidden_from_others(api, hub, repo_id, tmp_path, intruder_token):
    api.create_repo(repo_id, private=True)
    api.upload_file(path_or_fileobj=b"secret", path_in_repo="s.txt", repo_id=repo_id)
    assert api.repo_info(repo_id).private is True

    intruder = HfApi(endpoint=hub.endpoint, token=intruder_token)
    anonymous = HfApi(endpoint=hub.endpoint, token=False)
    for other in (intruder, anonymous):
        with pytest.raises(RepositoryNotFoundError):
            other.repo_info(repo_id)
        assert not other.file_exists(repo_id, "s.txt")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(repo_id, "s.txt", token=intruder_token, cache_dir=tmp_path)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(repo_id, "s.txt", token=False, cache_dir=tmp_path)
    with pytest.raises(RepositoryNotFoundError):
        intruder.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)


def test_visibility_change_applies(api, hub, repo_id, intruder_token):
    api.create_repo(repo_id)
    intruder = HfApi(endpoint=hub.endpoint, token=intruder_token)
    assert intruder.repo_exists(repo_id)

    api.update_repo_settings(repo_id, private=True)
    assert not intruder.repo_exists(repo_id)
    assert api.repo_info(repo_id).private is True

    api.update_repo_settings(repo_id, visibility="public")
    assert intruder.repo_exists(repo_id)
    with pytest.raises(HfHubHTTPError) as excinfo:
        intruder.update_repo_settings(repo_id, private=True)
    assert excinfo.value.response.status_code == 403


def test_public_repo_read_only_for_others(api, hub, repo_id, tmp_path, intruder_token):
    api.create_repo(repo_id)
    api.upload_file(path_or_fileobj=b"public", path_in_repo="p.txt", repo_id=repo_id)

    anonymous_path = hf_hub_download(repo_id, "p.txt", token=False, cache_dir=tmp_path)
    assert Path(anonymous_path).read_bytes() == b"public"
    intruder = HfApi(endpoint=hub.endpoint, token=intruder_token)
    assert intruder.repo_info(repo_id).sha == api.repo_info(repo_id).sha
    with pytest.raises(HfHubHTTPError) as excinfo:
        intruder.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)
    assert excinfo.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as excinfo:
        intruder.delete_repo(repo_id)
    assert excinfo.value.response.status_code == 403


def test_bad_token_rejected(hub, repo_id):
    bad = HfApi(endpoint=hub.endpoint, token="hf_not_registered_0000")
    with pytest.raises(HfHubHTTPError) as excinfo:
        bad.whoami()
    assert excinfo.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as excinfo:
        bad.create_repo(repo_id)
    assert excinfo.value.response.status_code == 401


def test_path_traversal_rejected(hub, api, repo_id):
    api.create_repo(repo_id)
    status, _, _ = _raw_request(
        hub, "GET", f"/api/models/{repo_id}/tree/main/../../etc", headers=_auth()
    )
    assert status == 400
    status, _, _ = _raw_request(hub, "GET", f"/{repo_id}/resolve/main/a/%2E%2E/b", headers=_auth())
    assert status == 400
    status, _, _ = _raw_request(hub, "GET", "/api/models/tester/..%2F..%2Fetc", headers=_auth())
    assert status == 400

    for bad_path in ("../evil.txt", "/etc/evil.txt", "a/../../evil.txt", ".git/config"):
        lines = [
            {"key": "header", "value": {"summary": "Escape"}},
            {"key": "file", "value": {"path": bad_path, "content": "eA==", "encoding": "base64"}},
        ]
        body = "".join(json.dumps(line) + "\n" for line in lines).encode()
        status, _, reply = _raw_request(
            hub,
            "POST",
            f"/api/models/{repo_id}/commit/main",
            body,
            {**_auth(), "Content-Type": "application/x-ndjson"},
        )
        assert status == 400, (bad_path, reply)
    assert api.list_repo_files(repo_id) == [".gitattributes"]


def test_commit_unknown_lfs_object_rejected(hub, api, repo_id):
    api.create_repo(repo_id)
    lines = [
        {"key": "header", "value": {"summary": "Reference a missing object"}},
        {
            "key": "lfsFile",
            "value": {"path": "w.bin", "algo": "sha256", "oid": "a" * 64, "size": 3},
        },
    ]
    body = "".join(json.dumps(line) + "\n" for line in lines).encode()
    response = get_session().post(
        f"{hub.endpoint}/api/models/{repo_id}/commit/main",
        content=body,
        headers={**_auth(), "Content-Type": "application/x-ndjson"},
    )
    assert response.status_code == 422
    assert "never uploaded" in response.json()["error"]
    assert api.list_repo_files(repo_id) == [".gitattributes"]


def test_lfs_upload_checks_signature_content(hub, api, repo_id):
    api.create_repo(repo_id)
    data = b"large file stand-in"
    oid = hashlib.sha256(data).hexdigest()
    batch = get_session().post(
        f"{hub.endpoint}/{repo_id}.git/info/lfs/objects/batch",
        json={"operation": "upload", "objects": [{"oid": oid, "size": len(data)}]},
        headers={**_auth(), "Accept": "application/vnd.git-lfs+json"},
    )
    href = batch.json()["objects"][0]["actions"]["upload"]["href"]
    assert get_session().put(href + "0", content=data).status_code == 403
    assert get_session().put(href, content=b"other content here!").status_code == 400
    assert get_session().put(href, content=data).status_code == 200
    again = get_session().post(
        f"{hub.endpoint}/{repo_id}.git/info/lfs/objects/batch",
        json={"operation": "upload", "objects": [{"oid": oid, "size": len(data)}]},
        headers=_auth(),
    )
    assert "actions" not in again.json()["objects"][0]


# ---------------------------------------------------------------------- faults


def test_commit_500_then_success(hub, api, repo_id):
    api.create_repo(repo_id)
    head = api.repo_info(repo_id).sha
    hub.faults.fail("commit", status=500, times=3)
    # huggingface_hub 2.4.0 does not retry the commit POST itself, so the caller retries.
    for _ in range(3):
        with pytest.raises(HfHubHTTPError) as excinfo:
            api.upload_file(path_or_fileobj=b"data", path_in_repo="f.txt", repo_id=repo_id)
        assert excinfo.value.response.status_code == 500
        assert api.repo_info(repo_id).sha == head
    api.upload_file(path_or_fileobj=b"data", path_in_repo="f.txt", repo_id=repo_id)
    assert hub.stats["commit"] == 4
    assert api.repo_info(repo_id).sha != head


def test_client_retries_server_errors(hub, api, repo_id):
    api.create_repo(repo_id)
    hub.faults.fail("preupload", status=503, times=2)
    api.upload_file(path_or_fileobj=b"data", path_in_repo="f.txt", repo_id=repo_id)
    assert hub.stats["preupload"] == 3
    assert "f.txt" in api.list_repo_files(repo_id)


def test_cut_lfs_upload_is_retried(hub, api, repo_id):
    api.create_repo(repo_id)
    hub.faults.cut("lfs_upload", after_bytes=1024, times=1)
    data = os.urandom(LFS_SIZE)
    api.upload_file(path_or_fileobj=data, path_in_repo="w.bin", repo_id=repo_id)
    assert hub.stats["lfs_upload"] == 2
    assert Path(hf_hub_download(repo_id, "w.bin")).read_bytes() == data


@pytest.mark.slow
def test_failed_lfs_upload_keeps_head(hub, api, repo_id):
    # The client retries a failed upload 5 times with 1 to 8 s pauses: about 23 s.
    api.create_repo(repo_id)
    head = api.repo_info(repo_id).sha
    hub.faults.cut("lfs_upload", after_bytes=1024, times=None)
    with pytest.raises(RuntimeError, match="Error while uploading"):
        api.upload_file(path_or_fileobj=os.urandom(LFS_SIZE), path_in_repo="w.bin", repo_id=repo_id)
    assert hub.stats["lfs_upload"] == 6
    assert hub.stats["commit"] == 0
    assert api.repo_info(repo_id).sha == head
    assert not api.file_exists(repo_id, "w.bin")


def test_stale_parent_commit_rejected(api, repo_id):
    api.create_repo(repo_id)
    first = api.upload_file(path_or_fileobj=b"1", path_in_repo="f.txt", repo_id=repo_id)
    api.upload_file(path_or_fileobj=b"2", path_in_repo="f.txt", repo_id=repo_id)
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_commit(
            repo_id,
            operations=[CommitOperationAdd("f.txt", b"3")],
            commit_message="Stale",
            parent_commit=first.oid,
        )
    assert excinfo.value.response.status_code == 412
    assert Path(hf_hub_download(repo_id, "f.txt")).read_bytes() == b"2"


def test_delay_fault_is_applied(hub, api):
    hub.faults.delay("whoami", seconds=0.2, times=1)
    assert api.whoami()["name"] == "tester"
    assert hub.stats["whoami"] == 1


def test_fault_arguments_validated(hub):
    with pytest.raises(ConfigurationError):
        hub.faults.fail("no_such_kind")
    with pytest.raises(ConfigurationError):
        hub.faults.fail("commit", status=200)
    with pytest.raises(ConfigurationError):
        hub.faults.cut("commit", after_bytes=-1)
    with pytest.raises(ConfigurationError):
        hub.faults.delay("commit", seconds=1, times=0)


# ---------------------------------------------------------------------- server lifecycle


def test_restarted_server_serves_same_repos(tmp_path):
    token = os.environ["HF_TOKEN"]
    with LocalHub(tmp_path / "store") as first:
        first.add_user("tester", token=token)
        api = HfApi(endpoint=first.endpoint, token=token)
        api.create_repo("tester/persisted")
        commit = api.upload_file(
            path_or_fileobj=b"kept", path_in_repo="k.txt", repo_id="tester/persisted"
        )
    with LocalHub(tmp_path / "store") as second:
        second.add_user("tester", token=token)
        api = HfApi(endpoint=second.endpoint, token=token)
        assert api.repo_info("tester/persisted").sha == commit.oid
        path = hf_hub_download(
            "tester/persisted", "k.txt", endpoint=second.endpoint, cache_dir=tmp_path / "cache"
        )
        assert Path(path).read_bytes() == b"kept"


def test_stop_closes_keepalive_connections(tmp_path):
    server = LocalHub(tmp_path / "store").start()
    host, port = server.endpoint.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.request("GET", "/api/agent-harnesses")
    response = connection.getresponse()
    response.read()
    assert response.status == 200
    assert not response.will_close

    server.stop()
    assert connection.sock.recv(1) == b""
    connection.close()


def test_users_and_host_validated(tmp_path):
    server = LocalHub(tmp_path / "store")
    server.add_user("alice", token="hf_alice_0000")
    with pytest.raises(ConfigurationError):
        server.add_user("bob", token="hf_alice_0000")
    with pytest.raises(ConfigurationError):
        server.add_user("api", token="hf_api_0000")
    with pytest.raises(ConfigurationError):
        server.add_user("../x", token="hf_x_0000")
    with pytest.raises(ConfigurationError):
        LocalHub(tmp_path / "store", port=70000)
    assert server.host == "127.0.0.1"


# ---------------------------------------------------------------------- path patterns


@pytest.mark.parametrize(
    ("rules", "path", "ignored"),
    [
        ("*.log", "run.log", True),
        ("*.log", "deep/dir/run.log", True),
        ("*.log\n!keep.log", "keep.log", False),
        ("/top.txt", "top.txt", True),
        ("/top.txt", "dir/top.txt", False),
        ("build/", "build/out.bin", True),
        ("build/", "build", False),
        ("docs/**/*.md", "docs/a/b/c.md", True),
        ("docs/**/*.md", "src/c.md", False),
        ("# comment\n\n", "anything", False),
        ("data/[ab].csv", "data/a.csv", True),
        ("data/[!ab].csv", "data/a.csv", False),
    ],
)
def test_gitignore_rules(rules, path, ignored):
    assert GitIgnore(rules).ignores(path) is ignored


@pytest.mark.parametrize(
    ("path", "size", "sample", "mode"),
    [
        ("model.safetensors", 10, b"x", "lfs"),
        ("saved_model/v1/variables.data", 10, b"x", "lfs"),
        ("events.out.tfevents.123", 10, b"x", "lfs"),
        ("config.json", 10, b"{}", "regular"),
        ("config.json", 10 * 1024 * 1024, b"{}", "lfs"),
        ("config.json", 10 * 1024 * 1024 - 1, b"{}", "regular"),
        ("data.txt", 5, b"a\x00b", "lfs"),
    ],
)
def test_upload_mode_rules(path, size, sample, mode):
    from hf_lifecycle.hub._server_patterns import DEFAULT_GITATTRIBUTES

    assert upload_mode(path, size, sample, GitAttributes(DEFAULT_GITATTRIBUTES)) == mode


def test_gitattributes_later_line_wins():
    attributes = GitAttributes("*.bin filter=lfs diff=lfs\nsmall.bin -filter\n")
    assert attributes.is_lfs("big.bin")
    assert not attributes.is_lfs("small.bin")


# ---------------------------------------------------------------------- transformers


def test_transformers_push_and_load(hub, repo_id):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    config = transformers.BertConfig(
        vocab_size=32,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config)
    model.push_to_hub(repo_id)

    loaded_config = transformers.AutoConfig.from_pretrained(repo_id)
    assert loaded_config.hidden_size == 16
    loaded = transformers.AutoModel.from_pretrained(repo_id)
    assert type(loaded) is transformers.BertModel
    expected = model.state_dict()
    actual = loaded.state_dict()
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, actual[name]), name


# ---------------------------------------------------------------------- command line


def test_cli_help():
    from typer.testing import CliRunner

    from hf_lifecycle.cli import app

    result = CliRunner().invoke(app, ["hub", "serve", "--help"])
    assert result.exit_code == 0
    assert "--port" in result.output
    assert "TOKEN=USER" in result.output


def test_cli_serve_whoami(tmp_path):
    command = [
        sys.executable,
        "-m",
        "hf_lifecycle.cli",
        "hub",
        "serve",
        "--port",
        "0",
        "--path",
        str(tmp_path / "store"),
        "--token",
        "hf_cli_token_0000=alice",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first_line = process.stdout.readline()
        assert first_line.startswith("Local Hub serving http://127.0.0.1:"), first_line
        endpoint = first_line.split()[3]
        assert HfApi(endpoint=endpoint, token="hf_cli_token_0000").whoami()["name"] == "alice"
        rest = [process.stdout.readline() for _ in range(3)]
        assert f"HF_ENDPOINT={endpoint} HF_HUB_DISABLE_XET=1" in "".join(rest)
    finally:
        process.terminate()
        stdout, stderr = process.communicate(timeout=20)
    assert process.returncode == 0, stderr
    assert "hf_cli_token_0000" not in stdout + stderr
    assert "Local Hub stopped." in stdout
