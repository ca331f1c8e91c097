"""``cm.hub``: local path or Hub id to a folder (offline first), and ``push_folder``.

Nothing here reaches the network: Hub ids resolve from a Hugging Face cache written by hand
(``helpers.write_hf_snapshot``); downloads and uploads go to a fake Hub on 127.0.0.1 that
answers the calls huggingface_hub makes: a revision, its file list and the files for
``snapshot_download``; create, the model card's metadata check, preupload and an NDJSON commit
(small files inline as base64) for ``create_repo`` + ``upload_folder``.
"""

import base64
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import fit, last_ckpt, write_hf_snapshot
from huggingface_hub import constants as hf_constants

from cm import hub
from cm.cli import main
from cm.errors import UserError

REPO = "cm-test/tiny-pipeline"
COMMIT = "c" * 40
FILES = {"model_index.json": b'{"_class_name": "ConsistencyModelPipeline"}', "unet/w.bin": b"w"}


class FakeHub(BaseHTTPRequestHandler):
    """The Hub API as huggingface_hub's downloads and small-file uploads use it."""

    def log_message(self, *args) -> None:
        pass

    def reply(self, code: int, body: dict | list, head: bool = False, **headers: str) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        for key, value in {"Content-Type": "application/json", **headers}.items():
            self.send_header(key.replace("_", "-"), value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def do_GET(self, head: bool = False) -> None:
        """``REPO`` at ``COMMIT``: its revision, its file list and each file."""
        path, files = self.path.split("?")[0], self.server.repo
        self.server.requests.append(f"{self.command} {path}")
        if path == f"/api/models/{REPO}/revision/main":
            return self.reply(200, {"id": REPO, "sha": COMMIT})
        if path == f"/api/models/{REPO}/tree/{COMMIT}":
            tree = [{"type": "file", "path": p, "size": len(files[p]), "oid": "0"} for p in files]
            return self.reply(200, tree)
        name = path.removeprefix(f"/{REPO}/resolve/{COMMIT}/")
        if name not in files:
            error = {"error": "Repository not found"}
            return self.reply(404, error, head, X_Error_Code="RepoNotFound")
        etag = f'"{sum(files[name]):040x}"'
        self.reply(200, files[name], head, X_Repo_Commit=COMMIT, ETag=etag)

    def do_HEAD(self) -> None:
        self.do_GET(head=True)

    def do_POST(self) -> None:
        """Create a repository, check a README's metadata, preupload (all "regular"), commit."""
        data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        server = self.server
        server.requests.append(f"POST {self.path}")
        if self.headers.get("Authorization") != "Bearer hf_good":
            return self.reply(401, {"error": "Invalid credentials in Authorization header"})
        base = f"http://127.0.0.1:{server.server_port}"
        route = re.fullmatch(r"/api/models/(\w+/[\w-]+)/(preupload|commit)/main", self.path)
        if self.path == "/api/repos/create":
            body = json.loads(data)
            server.created.append(body)
            return self.reply(200, {"url": f"{base}/{body['organization']}/{body['name']}"})
        if self.path == "/api/validate-yaml":  # the model card's metadata, before any upload
            return self.reply(200, {"errors": [], "warnings": []})
        if route and route[2] == "preupload":
            mode = {"uploadMode": "regular", "shouldIgnore": False}
            files = [{"path": f["path"], **mode} for f in json.loads(data)["files"]]
            return self.reply(200, {"files": files})
        if route and route[2] == "commit":
            server.commits.append([json.loads(line) for line in data.splitlines()])
            url = f"{base}/{route[1]}/commit/{'a' * 40}"
            return self.reply(200, {"commitUrl": url, "commitOid": "a" * 40})
        self.reply(404, {"error": f"no route {self.path}"})


def online(monkeypatch, endpoint: str) -> None:
    """Let cm.hub go online, to ``endpoint`` only (no telemetry call to huggingface.co)."""
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)


def closed_port() -> int:
    """A local port nothing listens on."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    port = server.server_port
    server.server_close()
    return port


@pytest.fixture
def fake_hub(monkeypatch):
    """A fake Hub on 127.0.0.1 serving ``REPO`` (``FILES``); cm.hub online to it only."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    server.repo, server.requests, server.created, server.commits = dict(FILES), [], [], []
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    online(monkeypatch, f"http://127.0.0.1:{server.server_port}")
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache (``HF_HUB_CACHE``), offline."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "hf").mkdir()
    return tmp_path / "hf"


@pytest.fixture
def calls(monkeypatch) -> list[tuple[str, bool]]:
    """Every ``snapshot_download`` of cm.hub as ``(repo_id, local_files_only)``."""
    calls, real = [], hub.snapshot_download

    def spy(repo_id, **kwargs):
        calls.append((repo_id, kwargs.get("local_files_only", False)))
        return real(repo_id, **kwargs)

    monkeypatch.setattr(hub, "snapshot_download", spy)
    return calls


# -- resolve -----------------------------------------------------------------------------------


def test_cache_location_follows_the_environment(tmp_path, monkeypatch):
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hub.cache_dir() == tmp_path / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub.cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    assert hub.cache_dir() == tmp_path / "c"
    assert hub.repo_folder("a/b") == tmp_path / "c" / "models--a--b"
    monkeypatch.setenv("HF_HUB_OFFLINE", "yes")
    assert hub.offline()
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not hub.offline()


def test_what_counts_as_a_hub_id():
    openai = "openai/diffusers-cd_imagenet64_l2"
    assert hub.parse_repo_id(openai) == (openai, None)
    timm = "timm/vit_large_patch14_clip_224.openai"
    assert hub.parse_repo_id(f"{timm}@v1") == (timm, "v1")
    assert hub.parse_repo_id("a/b@refs/pr/1") == ("a/b", "refs/pr/1")
    assert hub.parse_repo_id("a/b", revision="main") == ("a/b", "main")
    paths = ("configs/x.yaml", "runs/model.ckpt", "a/b/c", "./a/b", "/a/b", "~/a", "a", "a--b/c")
    for path in paths:
        assert hub.parse_repo_id(path) is None, path
    with pytest.raises(UserError, match="keep one of them"):
        hub.parse_repo_id("a/b@v1", revision="v2")


def test_cached_id_resolves_offline_and_a_local_path_wins(tmp_path, cache, calls, monkeypatch):
    snapshot = write_hf_snapshot(cache, REPO, FILES)
    assert hub.resolve(REPO) == snapshot
    assert (hub.resolve(REPO) / "unet" / "w.bin").read_bytes() == b"w"
    pinned = write_hf_snapshot(cache, REPO, {"model_index.json": b"{}"}, revision="v1")
    assert hub.resolve(f"{REPO}@v1") == pinned
    assert hub.resolve(REPO, revision="v1") == pinned
    assert hub.resolve(f"{REPO}@{pinned.name}") == pinned  # a commit hash
    assert all(local for _, local in calls)  # the cache only: no network call at all
    monkeypatch.chdir(tmp_path)
    (tmp_path / REPO).mkdir(parents=True)  # a local folder of the same name
    assert hub.resolve(REPO) == Path(REPO)
    assert hub.resolve(str(tmp_path / "hf")) == tmp_path / "hf"


def test_missing_id_is_one_clear_error(cache, calls, monkeypatch):
    with pytest.raises(FileNotFoundError) as info:
        hub.resolve("openai/diffusers-cd_imagenet64_l2", what="denoiser")
    message = str(info.value)
    assert "denoiser 'openai/diffusers-cd_imagenet64_l2' is not a local path" in message
    assert str(cache / "models--openai--diffusers-cd_imagenet64_l2") in message
    assert "HF_HUB_OFFLINE is set" in message
    assert "`hf download openai/diffusers-cd_imagenet64_l2`" in message and "\n" not in message
    with pytest.raises(FileNotFoundError, match="--revision v2"):
        hub.resolve("a/b@v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(FileNotFoundError, match=r"not in the Hugging Face cache \(.*--a--b\):"):
        hub.resolve("a/b", download=False)
    assert all(local for _, local in calls)


def test_neither_path_nor_id(cache, calls):
    for source in ("configs/nope.yaml", "runs/a/b/export", "nope"):
        with pytest.raises(FileNotFoundError, match=f"The model '{source}' does not exist: give"):
            hub.resolve(source)
    assert calls == []


def test_missing_id_downloads_when_the_network_allows(cache, calls, fake_hub, monkeypatch):
    folder = hub.resolve(REPO, allow_patterns=["*.json"])  # HF_HUB_OFFLINE=0, HF_ENDPOINT set
    assert folder == cache / "models--cm-test--tiny-pipeline" / "snapshots" / COMMIT
    assert sorted(p.name for p in folder.rglob("*") if p.is_file()) == ["model_index.json"]
    assert hub.resolve(REPO, allow_patterns=["*.json"]) == folder
    assert calls == [(REPO, True), (REPO, False), (REPO, True)]  # once cached, no network
    with pytest.raises(FileNotFoundError, match="the Hub has no such repository"):
        hub.resolve("cm-test/absent")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # unet/w.bin was never fetched: a partial snapshot
    with pytest.raises(FileNotFoundError, match=r"cache \(incomplete: .*\) and HF_HUB_OFFLINE"):
        hub.resolve(REPO)


def test_unreachable_hub_is_one_try_and_one_error(cache, calls, monkeypatch):
    online(monkeypatch, f"http://127.0.0.1:{closed_port()}")  # nothing listens there
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"the Hub could not be reached \(\w+\): on a"):
        hub.resolve("a/b")
    assert time.perf_counter() - start < 10
    assert calls == [("a/b", True), ("a/b", False)]


# -- push_folder -------------------------------------------------------------------------------


def export_folder(root: Path) -> tuple[Path, dict[str, bytes]]:
    """A small export folder with a model card (every file small enough to go inline)."""
    folder = root / "export"
    files = {**FILES, "README.md": b"# tiny\n", "scheduler/scheduler_config.json": b"{}"}
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder, files


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes."""
    files = (p for p in folder.rglob("*") if p.is_file())
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in files}


def test_push_folder_uploads_exactly_the_folder(tmp_path, fake_hub):
    folder, files = export_folder(tmp_path)
    url = hub.push_folder(folder, "me/tiny-cm", private=True, token="hf_good", commit_message="m")
    assert url == f"http://127.0.0.1:{fake_hub.server_port}/me/tiny-cm"
    assert fake_hub.created == [{"name": "tiny-cm", "organization": "me", "visibility": "private"}]
    api = "POST /api/models/me/tiny-cm"
    create, validate = "POST /api/repos/create", "POST /api/validate-yaml"
    assert fake_hub.requests == [create, validate, f"{api}/preupload/main", f"{api}/commit/main"]
    (commit,) = fake_hub.commits
    assert commit[0] == {"key": "header", "value": {"summary": "m", "description": ""}}
    sent = {op["value"]["path"]: base64.b64decode(op["value"]["content"]) for op in commit[1:]}
    assert sent == files and snapshot(folder) == files


def test_push_failures_are_one_user_error_and_keep_the_folder(tmp_path, fake_hub, monkeypatch):
    folder, files = export_folder(tmp_path)
    with pytest.raises(UserError, match=r"\(HfHubHTTPError 401: .*write access.*is kept"):
        hub.push_folder(folder, "me/tiny-cm", token="hf_bad")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(UserError, match=r"\(ConnectError.*check the network .*is kept; `hf upload"):
        hub.push_folder(folder, "me/tiny-cm", token="hf_good")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(UserError, match="no Hugging Face token .*`hf auth login`"):
        hub.push_folder(folder, "me/tiny-cm")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set"):
        hub.push_folder(folder, "me/tiny-cm", token="hf_good")
    with pytest.raises(UserError, match="not a Hub repository id"):
        hub.push_folder(folder, "me/tiny cm", token="hf_good")
    with pytest.raises(UserError, match="not a folder with files"):
        hub.push_folder(tmp_path / "nothing", "me/tiny-cm", token="hf_good")
    assert snapshot(folder) == files and not fake_hub.commits


def test_cm_export_push_to_hub_sends_the_export_with_its_card(tmp_path, fake_hub, monkeypatch):
    """``cm export --push_to_hub`` end to end against the fake Hub: every file, byte for byte."""
    fit(tmp_path / "run", 1)
    monkeypatch.setenv("HF_TOKEN", "hf_good")
    out = tmp_path / "export"
    main(["export", "--ckpt_path", str(last_ckpt(tmp_path / "run")), "--out", str(out),
          "--push_to_hub", "me/tiny-cm"])
    (commit,) = fake_hub.commits
    sent = {op["value"]["path"]: base64.b64decode(op["value"]["content"]) for op in commit[1:]}
    assert sent == snapshot(out)
    assert {"README.md", "model.safetensors", "config.json", "training_config.yaml"} == set(sent)
