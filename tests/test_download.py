"""Tests for util.download against a loopback HTTP server (no real network)."""

from __future__ import annotations

import http.server
import random
import re
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import pytest

from util import download as dl

PAYLOAD = random.Random(0).randbytes(300 * 1024)


@dataclass
class ServerState:
    """What the handler serves and how it misbehaves; records request headers.

    ``mode`` is one of ``normal``, ``truncate`` (announce the full length but
    close after half the body), ``ignore_range`` (always 200) or ``404``.
    """

    data: bytes = PAYLOAD
    mode: str = "normal"
    requests: list[dict[str, str]] = field(default_factory=list)


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serve ``server.state.data`` with ``Range: bytes=N-`` support."""

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        state: ServerState = self.server.state  # type: ignore[attr-defined]
        state.requests.append(dict(self.headers.items()))
        if state.mode == "404":
            self.send_error(404, "Not Found")
            return
        data = state.data
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if match and state.mode != "ignore_range":
            self._send_range(data, int(match.group(1)))
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        body = data[: len(data) // 2] if state.mode == "truncate" else data
        self.wfile.write(body)
        self.close_connection = True

    def _send_range(self, data: bytes, start: int) -> None:
        """Answer a range request with 206, or 416 when it starts past the end."""
        if start >= len(data):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        """Keep test output quiet."""


@pytest.fixture
def server() -> Iterator[tuple[str, ServerState]]:
    """Run a threaded loopback server; yield its file URL and its state."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.state = ServerState()  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    host, port = httpd.server_address[:2]
    try:
        yield f"http://{host}:{port}/kl16.ckpt", httpd.state  # type: ignore[attr-defined]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def fake_registry(monkeypatch: pytest.MonkeyPatch, server: tuple[str, ServerState]) -> dict:
    """Point the registry at the loopback server."""
    url, _ = server
    registry = {
        "vae": dl.ReleasedFile("vae", "vae/kl16.ckpt", url, 1),
        "mar_base": dl.ReleasedFile("mar_base", "mar/mar_base/checkpoint-last.pth", url, 1),
    }
    monkeypatch.setattr(dl, "RELEASED_FILES", registry)
    return registry


def _fetch(url: str, dest: Path) -> Path:
    return dl.download_file(url, dest, chunk_size=16 * 1024, progress=False, timeout=5)


def test_full_download(server: tuple[str, ServerState], tmp_path: Path) -> None:
    url, state = server
    dest = tmp_path / "sub" / "kl16.ckpt"
    assert _fetch(url, dest) == dest
    assert dest.read_bytes() == PAYLOAD
    assert not dl.part_path(dest).exists()
    assert len(state.requests) == 1
    assert state.requests[0]["User-Agent"] == "Wget/1.16 (linux-gnu)"
    assert "Range" not in state.requests[0]


def test_interrupted_download_then_resume(server: tuple[str, ServerState], tmp_path: Path) -> None:
    url, state = server
    dest = tmp_path / "kl16.ckpt"
    part = dl.part_path(dest)
    half = len(PAYLOAD) // 2

    state.mode = "truncate"
    with pytest.raises(dl.DownloadError, match=rf"interrupted after {half} of {len(PAYLOAD)} bytes.*resume"):
        _fetch(url, dest)
    assert not dest.exists()
    assert part.read_bytes() == PAYLOAD[:half]

    state.mode = "normal"
    _fetch(url, dest)
    assert state.requests[-1]["Range"] == f"bytes={half}-"
    assert state.requests[-1]["User-Agent"] == "Wget/1.16 (linux-gnu)"
    assert dest.read_bytes() == PAYLOAD
    assert not part.exists()


def test_server_ignoring_range_restarts_from_zero(
    server: tuple[str, ServerState], tmp_path: Path
) -> None:
    url, state = server
    dest = tmp_path / "kl16.ckpt"
    dl.part_path(dest).write_bytes(b"stale bytes that must not survive")
    state.mode = "ignore_range"
    _fetch(url, dest)
    assert "Range" in state.requests[-1]
    assert dest.read_bytes() == PAYLOAD
    assert not dl.part_path(dest).exists()


def test_complete_part_is_finalized_on_416(server: tuple[str, ServerState], tmp_path: Path) -> None:
    url, state = server
    dest = tmp_path / "kl16.ckpt"
    dl.part_path(dest).write_bytes(PAYLOAD)
    _fetch(url, dest)
    assert state.requests[-1]["Range"] == f"bytes={len(PAYLOAD)}-"
    assert dest.read_bytes() == PAYLOAD
    assert not dl.part_path(dest).exists()


def test_http_404_is_a_clear_error(server: tuple[str, ServerState], tmp_path: Path) -> None:
    url, state = server
    state.mode = "404"
    dest = tmp_path / "vae" / "kl16.ckpt"
    with pytest.raises(dl.DownloadError, match="HTTP 404") as info:
        _fetch(url, dest)
    assert url in str(info.value) and str(dest) in str(info.value)
    assert not dest.exists()
    assert not dl.part_path(dest).exists()


def test_unreachable_host_says_how_to_download_manually(tmp_path: Path) -> None:
    with socket.socket() as sock:  # Grab a free port, then leave it closed.
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/kl16.ckpt"
    dest = tmp_path / "kl16.ckpt"
    with pytest.raises(dl.DownloadError, match="manually") as info:
        _fetch(url, dest)
    assert url in str(info.value) and str(dest) in str(info.value)
    assert not dest.exists()


def test_existing_file_is_skipped_unless_overwrite(
    server: tuple[str, ServerState], fake_registry: dict, tmp_path: Path
) -> None:
    _, state = server
    dest = tmp_path / "vae" / "kl16.ckpt"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"old")

    assert dl.download("vae", tmp_path, progress=False) == dest
    assert dest.read_bytes() == b"old"
    assert state.requests == []

    dl.download("vae", tmp_path, overwrite=True, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert len(state.requests) == 1


def test_registry_layout_and_urls() -> None:
    assert set(dl.RELEASED_FILES) == {"vae", "mar_base", "mar_large", "mar_huge"}
    for name, entry in dl.RELEASED_FILES.items():
        assert entry.name == name
        expected = "vae/kl16.ckpt" if name == "vae" else f"mar/{name}/checkpoint-last.pth"
        assert entry.relpath == expected
        parsed = urlparse(entry.url)
        assert parsed.scheme == "https" and parsed.netloc == "www.dropbox.com"
        assert parsed.path.endswith("/" + Path(entry.relpath).name)
        assert "rlkey=" in parsed.query and entry.approx_mb > 0


def test_resolve_names_expands_all() -> None:
    assert dl.resolve_names(["mar_base", "all"]) == ["mar_base", "vae", "mar_large", "mar_huge"]


def test_cli_downloads_into_dest(
    server: tuple[str, ServerState], fake_registry: dict, tmp_path: Path
) -> None:
    assert dl.main(["all", "--dest", str(tmp_path)]) == 0
    for entry in fake_registry.values():
        assert (tmp_path / entry.relpath).read_bytes() == PAYLOAD
    assert dl.main(["vae", "--dest", str(tmp_path)]) == 0  # Already there: skipped.
    assert len(server[1].requests) == len(fake_registry)


def test_cli_reports_errors_without_traceback(
    server: tuple[str, ServerState],
    fake_registry: dict,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server[1].mode = "404"
    assert dl.main(["vae", "--dest", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "error: HTTP 404" in err and "Traceback" not in err


def test_cli_rejects_unknown_names() -> None:
    with pytest.raises(SystemExit) as info:
        dl.main(["mar_tiny"])
    assert info.value.code != 0
