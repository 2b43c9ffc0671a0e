"""The official LM fetched by URL once (wavlm_ddp/decoding/fetch.py): from a local file://
URL and from a local HTTP server that honours Range requests, continued after a broken
download, checked against its SHA-256, unpacked, and one line when there is no network.
Nothing leaves this machine."""

import gzip
import hashlib
import http.server
import threading
from pathlib import Path

import pytest

from helpers import free_port
from wavlm_ddp.decoding.fetch import fetch
from wavlm_ddp.decoding.ngram import build_lm
from wavlm_ddp.preflight import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def packed_lm(tmp_path):
    """(an ARPA LM of the demo transcripts, its .gz, the .gz's SHA-256)."""
    arpa = tmp_path / "lm.arpa"
    build_lm([str(ROOT / "recipes" / "demo_data" / "train.csv")], str(arpa), order=3)
    packed = tmp_path / "4-gram.arpa.gz"
    packed.write_bytes(gzip.compress(arpa.read_bytes() * 20))  # a few hundred kB: several reads
    return arpa, packed, hashlib.sha256(packed.read_bytes()).hexdigest()


def test_a_file_url_is_fetched_once_unpacked_and_checked(packed_lm, tmp_path):
    arpa, packed, sha = packed_lm
    dest = tmp_path / "run" / "save" / "official.arpa"
    lines = []
    assert fetch(packed.as_uri(), dest, sha, log=lines.append) == dest
    assert dest.read_bytes() == arpa.read_bytes() * 20
    assert lines == [f"fetched {packed.as_uri()} into {dest} (SHA-256 of the download {sha})"]
    assert sorted(p.name for p in dest.parent.iterdir()) == ["official.arpa"]  # no part file left
    packed.unlink()  # a second run finds the file and fetches nothing
    assert fetch(packed.as_uri(), dest, sha, log=lines.append) == dest and len(lines) == 1


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves `payload` at any path, honouring `Range: bytes=N-` as servers do (206, or 416
    past the end); records the Range headers it was sent; with `cut_after` set, the first
    reply stops after that many bytes of its body (a lost connection)."""
    payload, ranges, cut_after = b"", [], None

    def do_GET(self):
        wanted = self.headers.get("Range")
        self.ranges.append(wanted)
        if self.path.endswith("/missing.gz"):
            self.send_error(404)
            return
        start = int(wanted.split("=")[1].rstrip("-")) if wanted else 0
        if start >= len(self.payload):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(self.payload)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = self.payload[start:]
        self.send_response(206 if wanted else 200)
        self.send_header("Content-Length", str(len(body)))
        if wanted:
            self.send_header("Content-Range", f"bytes {start}-{len(self.payload) - 1}/{len(self.payload)}")
        self.end_headers()
        cut, RangeHandler.cut_after = RangeHandler.cut_after, None
        self.wfile.write(body if cut is None else body[:cut])
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server(packed_lm):
    RangeHandler.payload, RangeHandler.ranges, RangeHandler.cut_after = packed_lm[1].read_bytes(), [], None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), RangeHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/4-gram.arpa.gz"
    httpd.shutdown()


def test_a_broken_download_is_continued_where_it_stopped(packed_lm, server, tmp_path):
    arpa, packed, sha = packed_lm
    dest = tmp_path / "official.arpa"
    half = len(RangeHandler.payload) // 2
    (tmp_path / "official.arpa.part").write_bytes(RangeHandler.payload[:half])  # what a lost connection left
    lines = []
    fetch(server, dest, sha, log=lines.append)
    assert RangeHandler.ranges == [f"bytes={half}-"]  # only the rest was asked for
    assert lines[0] == f"continuing the download of {server} after {half} bytes"
    assert dest.read_bytes() == arpa.read_bytes() * 20


def test_a_download_with_another_checksum_is_refused_and_not_kept(packed_lm, server, tmp_path):
    dest = tmp_path / "official.arpa"
    with pytest.raises(ConfigError, match=r"downloaded with SHA-256 [0-9a-f]{64}, not the expected 0{64} \(lm_sha256\)"):
        fetch(server, dest, "0" * 64, log=lambda line: None)
    assert list(tmp_path.glob("official.arpa*")) == []  # neither the file nor a part taken for a start


def test_no_network_is_one_line_naming_the_url_and_the_way_around(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/4-gram.arpa.gz"  # nothing listens there
    with pytest.raises(ConfigError) as refused:
        fetch(url, tmp_path / "official.arpa", timeout_s=5)
    line = str(refused.value)
    assert "\n" not in line and line.startswith(f"could not fetch {url} (")
    assert line.endswith("download it on a machine with network and set --lm_path to the file (or run again to "
                         "continue the download)")
    assert not (tmp_path / "official.arpa").exists()


def test_a_connection_lost_mid_download_is_one_line_and_the_next_run_continues_it(packed_lm, server, tmp_path):
    arpa, packed, sha = packed_lm
    dest = tmp_path / "official.arpa"
    RangeHandler.cut_after = 1000
    with pytest.raises(ConfigError, match=r"could not fetch .* run again to continue the download$"):
        fetch(server, dest, sha, log=lambda line: None)
    assert not dest.exists() and (tmp_path / "official.arpa.part").stat().st_size == 1000
    fetch(server, dest, sha, log=lambda line: None)
    assert RangeHandler.ranges == [None, "bytes=1000-"]
    assert dest.read_bytes() == arpa.read_bytes() * 20


def test_a_part_that_is_already_whole_is_finished_not_downloaded_again(packed_lm, server, tmp_path):
    """A run killed after the last byte and before the check and the rename: the server
    answers the next Range request with 416, and the part is checked and unpacked."""
    arpa, packed, sha = packed_lm
    dest = tmp_path / "official.arpa"
    (tmp_path / "official.arpa.part").write_bytes(RangeHandler.payload)
    fetch(server, dest, sha, log=lambda line: None)
    assert RangeHandler.ranges == [f"bytes={len(RangeHandler.payload)}-"]
    assert dest.read_bytes() == arpa.read_bytes() * 20


def test_a_missing_file_on_the_server_names_the_http_error(server, tmp_path):
    url = server.replace("4-gram.arpa.gz", "missing.gz")
    with pytest.raises(ConfigError, match=r"could not fetch .*missing.gz \(HTTP 404 .*\): check the URL \(lm_url\)"):
        fetch(url, tmp_path / "out" / "official.arpa", log=lambda line: None)
    assert list((tmp_path / "out").iterdir()) == []
