"""A model that cannot be loaded fails once, in seconds, with one error line: the
model is resolved (locally, or with one request to the hub) before any work."""

from __future__ import annotations

import http.server
import socket
import threading

import pytest
from typer.testing import CliRunner

import wclust.models as models
from wclust.cli import app
from wclust.models import ModelSourceError, resolve_model

NO_SUCH_ID = "wclust-tests-no-such-org/no-such-model-0"


@pytest.fixture
def no_network(monkeypatch):
    """Fails the test if the hub is asked."""

    def refuse(url, timeout):
        raise AssertionError(f"the hub was asked: {url}")

    monkeypatch.setattr(models, "_hub_head", refuse)


@pytest.fixture
def online(monkeypatch):
    """HF_HUB_OFFLINE unset, as for a user with a network."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_local_sources_resolve_without_network(no_network, tmp_path):
    assert resolve_model("whisper-tiny.en") == "builtin"
    assert resolve_model("torchvision:resnet18") == "torchvision"
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == "folder"
    f = tmp_path / "m.wclust"
    f.write_bytes(b"x")
    assert resolve_model(str(f)) == "file"


@pytest.mark.parametrize("spec", ["/no/such/folder", "./no-such-folder", "a/b/c", "x.wclust"])
def test_a_missing_folder_is_one_clear_error(no_network, spec):
    with pytest.raises(ModelSourceError, match="no such file or folder") as e:
        resolve_model(spec)
    assert "\n" not in str(e.value) and "whisper-tiny.en" in str(e.value)


def test_a_folder_without_config_is_named(no_network, tmp_path):
    with pytest.raises(ModelSourceError, match="without config.json"):
        resolve_model(str(tmp_path))


def test_an_unknown_hub_id_offline_fails_without_network(no_network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="HF_HUB_OFFLINE") as e:
        resolve_model(NO_SUCH_ID)
    assert "whisper-tiny.en" in str(e.value)  # what would work instead
    with pytest.raises(ModelSourceError, match="not a valid hub id"):
        resolve_model("bad name!")


class _Hub(http.server.BaseHTTPRequestHandler):
    """A stand-in for the hub that knows no model and counts the requests."""

    requests: list[str] = []

    def do_HEAD(self):  # noqa: N802 - the http.server hook
        type(self).requests.append(self.path)
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args):
        pass


def _hub_at(monkeypatch, port: int) -> None:
    from huggingface_hub import constants

    template = f"http://127.0.0.1:{port}/{{repo_id}}/resolve/{{revision}}/{{filename}}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)


def test_an_unknown_hub_id_is_asked_once(online, monkeypatch):
    server = http.server.HTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Hub.requests = []
    try:
        _hub_at(monkeypatch, server.server_address[1])
        with pytest.raises(ModelSourceError, match="HTTP 404"):
            resolve_model(NO_SUCH_ID, timeout=5)
    finally:
        server.shutdown()
        server.server_close()
    assert _Hub.requests == [f"/{NO_SUCH_ID}/resolve/main/config.json"]


def test_an_unreachable_hub_is_one_attempt(online, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _hub_at(monkeypatch, port)
    calls = []
    real = models._hub_head
    monkeypatch.setattr(models, "_hub_head", lambda *a: calls.append(a) or real(*a))
    with pytest.raises(ModelSourceError, match="did not answer") as e:
        resolve_model(NO_SUCH_ID, timeout=5)
    assert len(calls) == 1 and "check the network" in str(e.value)


@pytest.mark.parametrize("spec", [NO_SUCH_ID, "/no/such/folder"])
def test_compare_fails_once_before_any_cell(no_network, monkeypatch, tmp_path, spec):
    import wclust.measure.executors as executors

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_cells(*args, **kwargs):
        raise AssertionError("a cell ran")

    monkeypatch.setattr(executors.LocalExecutor, "map", no_cells)
    out = tmp_path / "res"
    r = CliRunner().invoke(app, ["compare", "-m", spec, "--methods", "fp32,nf4", "-o", out])
    assert r.exit_code == 2, r.output
    assert "FAILED" not in r.output and not out.exists()
    (line,) = [x for x in r.output.splitlines() if x.strip()]
    assert line.startswith("error: cannot load model")
    # the API too: run_compare resolves before it makes its folder
    from wclust.measure.compare import run_compare

    with pytest.raises(ModelSourceError):
        run_compare(spec, ["fp32"], out)
    assert not out.exists()


@pytest.mark.parametrize("spec", [NO_SUCH_ID, "/no/such/folder"])
def test_compress_fails_once_before_loading(no_network, monkeypatch, tmp_path, spec):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = CliRunner().invoke(app, ["compress", spec, "-o", tmp_path / "x.wclust"])
    assert r.exit_code == 2, r.output
    (line,) = [x for x in r.output.splitlines() if x.strip()]
    assert line.startswith("error: cannot load model")
