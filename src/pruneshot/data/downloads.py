"""Resumable, verified HTTP downloads using only the standard library."""

from __future__ import annotations

import hashlib
import http.client
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

_CHUNK = 1 << 16
#: Default of ``data.download.min_rate_bps`` (config/schema.yaml): bytes per second.
MIN_RATE_BPS = 10_000.0
#: Length of the windows the transfer rate is measured over, in seconds.
RATE_WINDOW_S = 30.0


class DownloadError(RuntimeError):
    """A download failed permanently (bad status, checksum mismatch, or retries exhausted)."""


class _RetryableError(Exception):
    """Internal: a transient failure worth another attempt."""


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _content_range_start(value: str | None) -> int | None:
    """Start offset from a ``Content-Range: bytes START-END/TOTAL`` header, or None."""
    if not value or not value.startswith("bytes "):
        return None
    try:
        return int(value[6:].split("-", 1)[0])
    except ValueError:
        return None


def _attempt(url: str, part: Path, timeout_s: float, min_rate_bps: float = 0.0,
             rate_window_s: float = RATE_WINDOW_S) -> None:
    """One transfer into ``part``, resuming if it exists; raise _RetryableError or DownloadError.

    ``min_rate_bps`` (bytes/s, 0: no minimum): the body must arrive at least this fast over each
    consecutive ``rate_window_s`` seconds, checked after every read (a read returns as soon as any
    bytes arrive, and waits at most ``timeout_s``)."""
    offset = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout_s)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and offset:  # stale .part (e.g. larger than the file): start over
            part.unlink(missing_ok=True)
            raise _RetryableError(f"HTTP 416 for range bytes={offset}-") from e
        if e.code >= 500 or e.code in (408, 429):
            raise _RetryableError(f"HTTP {e.code}") from e
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise _RetryableError(f"connection error: {e}") from e

    with resp:
        length_hdr = resp.headers.get("Content-Length")
        length = int(length_hdr) if length_hdr is not None else None
        if resp.status == 206 and _content_range_start(resp.headers.get("Content-Range")) == offset:
            mode, start = "ab", offset
        else:  # 200 (server ignored Range) or an inconsistent 206: restart from zero
            if resp.status == 206:
                resp.close()
                part.unlink(missing_ok=True)
                raise _RetryableError("206 with unexpected Content-Range")
            mode, start = "wb", 0
        expected = start + length if length is not None else None
        read = getattr(resp, "read1", resp.read)  # read1: whatever has arrived, not a full chunk
        received = 0  # bytes of this attempt
        window_start, window_bytes = time.monotonic(), 0
        try:
            with open(part, mode) as f:
                for chunk in iter(lambda: read(_CHUNK), b""):
                    f.write(chunk)
                    received += len(chunk)
                    window_bytes += len(chunk)
                    elapsed = time.monotonic() - window_start
                    if min_rate_bps > 0 and elapsed >= rate_window_s:
                        if window_bytes < min_rate_bps * elapsed:
                            total = f"{start + received} of {expected}" if expected is not None else \
                                f"{start + received}"
                            raise _RetryableError(
                                f"transfer too slow: {window_bytes} bytes in the last {elapsed:.1f} s "
                                f"({window_bytes / elapsed:.0f} bytes/s), below the minimum of {min_rate_bps:g} "
                                f"bytes/s (data.download.min_rate_bps); {total} bytes received")
                        window_start, window_bytes = time.monotonic(), 0
        except (OSError, http.client.HTTPException) as e:
            raise _RetryableError(f"transfer interrupted: {e}") from e
    got = part.stat().st_size
    if expected is not None and got != expected:
        if got > expected:
            part.unlink(missing_ok=True)
        raise _RetryableError(f"truncated transfer: {got} of {expected} bytes")


def fetch(
    url: str,
    dest: Path,
    sha256: str | None,
    *,
    attempts: int = 3,
    timeout_s: float = 30,
    backoff_s: float = 0.5,
    min_rate_bps: float = MIN_RATE_BPS,
    rate_window_s: float = RATE_WINDOW_S,
) -> Path:
    """Download ``url`` to ``dest`` (atomically) and return ``dest``.

    Streams into ``dest + '.part'``, resuming it with a Range request when the server answers 206
    (restarting on 200). Size is checked against Content-Length and, if given, the sha256. HTTP 5xx,
    connection errors, truncated bodies and transfers slower than ``min_rate_bps`` bytes/s over a
    ``rate_window_s``-second window are retried (``attempts`` in total, exponential backoff from
    ``backoff_s`` seconds); ``timeout_s`` (seconds) bounds each connect and read. Other 4xx errors and
    checksum mismatches raise :class:`DownloadError` at once. When every attempt fails, the ``.part``
    file is kept so that a later call resumes it. If ``dest`` already exists and matches ``sha256`` (or
    no hash is given) nothing is fetched. ``min_rate_bps`` 0: no minimum rate.
    """
    dest = Path(dest)
    want = sha256.lower() if sha256 else None
    if dest.exists() and (want is None or sha256_of(dest) == want):
        return dest
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    if min_rate_bps < 0:
        raise ValueError(f"min_rate_bps must be >= 0 (bytes/s), got {min_rate_bps}")
    if rate_window_s <= 0:
        raise ValueError(f"rate_window_s must be > 0 (seconds), got {rate_window_s}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(dest.suffix + ".part")
    last: Exception | None = None
    for i in range(attempts):
        if i:
            time.sleep(backoff_s * 2 ** (i - 1))
        try:
            _attempt(url, part, timeout_s, min_rate_bps, rate_window_s)
        except _RetryableError as e:
            last = e
            continue
        if want is not None:
            got = sha256_of(part)
            if got != want:
                part.unlink(missing_ok=True)
                raise DownloadError(f"{url}: sha256 mismatch: expected {want}, got {got}")
        os.replace(part, dest)
        return dest
    size = part.stat().st_size if part.exists() else 0
    if not size:  # nothing to resume
        part.unlink(missing_ok=True)
    kept = f"; {part} ({size} bytes) is kept for the next run to resume" if size else ""
    raise DownloadError(f"{url}: failed after {attempts} attempts: {last}{kept}")
