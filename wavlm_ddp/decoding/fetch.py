"""Fetch a file by URL once: LibriSpeech's official 4-gram LM for the beam search.

The download goes to `<dest>.part`, which a later attempt continues (an HTTP Range
request; a server that ignores it sends the whole file again, and the part is started
afresh; a part that is already whole is answered 416 and kept); a download shorter than
the server announced is an error that the next attempt continues. The finished download
is checked against its SHA-256 when one is given, and only then decompressed (a `.gz`
URL) and moved to `dest` in one rename: `dest` exists only when whole. Every failure is
one line: no network, an HTTP error, a full disk, a damaged archive."""

import gzip
import hashlib
import http.client
import os
import re
import shutil
import urllib.error
import urllib.request
import zlib
from pathlib import Path

from wavlm_ddp.preflight import ConfigError

CHUNK = 1 << 20


def fetch(url, dest, sha256=None, timeout_s=60.0, log=print):
    """Make `dest` the file at `url` (decompressed when the URL ends in .gz); nothing to
    do when `dest` exists. Returns `dest`. ConfigError with one line on failure."""
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    _download(url, part, timeout_s, log)
    digest = _sha256(part)
    if sha256 is not None and digest != sha256.lower():
        part.unlink()
        raise ConfigError(f"{url} downloaded with SHA-256 {digest}, not the expected {sha256} (lm_sha256): the "
                          "download was damaged or the file changed; run again to download it afresh, or check "
                          "lm_sha256")
    tmp = dest.with_name(dest.name + ".unpacked")
    try:
        if url.endswith(".gz") and dest.suffix != ".gz":
            with gzip.open(part, "rb") as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, CHUNK)
                out.flush()
                os.fsync(out.fileno())
            part.unlink()
        else:
            os.replace(part, tmp)
        os.replace(tmp, dest)
    except (EOFError, zlib.error, gzip.BadGzipFile) as damaged:
        part.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"{url} is not a whole gzip file ({damaged}): its download was removed; run again to "
                          "download it afresh") from None
    except OSError as failed:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"could not write {dest} ({failed.strerror or failed}): free space or fix the folder, then "
                          "run again (the download is kept)") from None
    log(f"fetched {url} into {dest} (SHA-256 of the download {digest})")
    return dest


def _download(url, part, timeout_s, log):
    """Append the rest of `url` to `part` (continuing what an earlier attempt left)."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as error:
        whole = re.fullmatch(r"bytes \*/(\d+)", error.headers.get("Content-Range", "") or "")
        if error.code == 416 and have and (whole is None or int(whole.group(1)) == have):
            return  # the part is whole already: an earlier attempt stopped after its last byte
        raise ConfigError(f"could not fetch {url} (HTTP {error.code} {error.reason}): check the URL (lm_url), or "
                          "download the file on a machine with network and set --lm_path to it") from None
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise ConfigError(f"could not fetch {url} ({reason}): download it on a machine with network and set "
                          "--lm_path to the file (or run again to continue the download)") from None
    with response:
        status = getattr(response, "status", None)
        expected = response.headers.get("Content-Length")
        expected = int(expected) if expected and expected.isdigit() else None
        span = re.fullmatch(r"bytes (\d+)-\d+/(\d+)", response.headers.get("Content-Range", "") or "")
        if have and status == 206 and span and int(span.group(1)) != have:
            have = 0  # the server sent another range than asked: start afresh
        if have and status != 206:  # the whole file again: skip what is there (file://) or start over
            if url.startswith("file:"):
                skipped = 0
                while skipped < have and (chunk := response.read(min(CHUNK, have - skipped))):
                    skipped += len(chunk)
                expected = None if expected is None else expected - skipped
                if skipped < have:  # the source is shorter than the part: not the same file
                    have, expected = 0, None
                    part.unlink()
                    return _download(url, part, timeout_s, log)
            else:
                have = 0
        if have:
            log(f"continuing the download of {url} after {have} bytes")
        received = 0
        try:
            with open(part, "ab" if have else "wb") as out:
                while True:
                    try:
                        chunk = response.read(CHUNK)
                    except (OSError, http.client.HTTPException) as error:
                        out.flush()
                        raise ConfigError(f"could not fetch {url} (the connection broke: {error!r}): run again to "
                                          "continue the download") from None
                    if not chunk:
                        break
                    out.write(chunk)
                    received += len(chunk)
                out.flush()
                os.fsync(out.fileno())
        except OSError as failed:
            raise ConfigError(f"could not write {part} ({failed.strerror or failed}): free space or fix the folder, "
                              "then run again to continue the download") from None
    if expected is not None and received < expected:
        raise ConfigError(f"could not fetch {url} (the connection closed after {have + received} bytes of "
                          f"{have + expected}): run again to continue the download")


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
