"""Fetch a file by URL once: LibriSpeech's official 4-gram LM for the beam search.

The download goes to `<dest>.part`, which a later attempt continues (an HTTP Range
request; a server that ignores it sends the whole file again, and the part is started
afresh); the finished download is checked against its SHA-256 when one is given, and
only then decompressed (a `.gz` URL) and moved to `dest` in one rename: `dest` exists
only when whole. Without network: one line naming the URL and the way around it."""

import gzip
import hashlib
import os
import shutil
import urllib.error
import urllib.request
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
    if url.endswith(".gz") and dest.suffix != ".gz":
        with gzip.open(part, "rb") as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, CHUNK)
            out.flush()
            os.fsync(out.fileno())
        part.unlink()
    else:
        os.replace(part, tmp)
    os.replace(tmp, dest)
    log(f"fetched {url} into {dest} (SHA-256 of the download {digest})")
    return dest


def _download(url, part, timeout_s, log):
    """Append the rest of `url` to `part` (continuing what an earlier attempt left)."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            status = getattr(response, "status", None)
            if have and status != 206:  # the whole file again: skip what is there (file://) or start over
                if url.startswith("file:"):
                    response.read(have)
                else:
                    have = 0
            if have:
                log(f"continuing the download of {url} after {have} bytes")
            with open(part, "ab" if have else "wb") as out:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise ConfigError(f"could not fetch {url} ({reason}): download it on a machine with network and set "
                          "--lm_path to the file (or run again to continue the download)") from None


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
