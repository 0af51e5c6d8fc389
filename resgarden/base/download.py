"""Safe downloads: HTTPS only, hash checked before use, atomic, nothing left behind on failure."""
from __future__ import annotations

import hashlib
import http.client
import logging
import os
import urllib.error
import urllib.parse
import urllib.request

from resgarden.base.atomic import atomic_path
from resgarden.base.errors import UserError

logger = logging.getLogger("resgarden")


class DownloadError(UserError):
    """A download failed or its content is not what was published; the message is for the user."""


def file_digest(path: str, algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_url(url: str) -> None:
    """HTTPS only (certificates verified by urllib); plain HTTP only to this machine, for tests."""
    parsed = urllib.parse.urlparse(url)
    loopback = parsed.hostname in ("127.0.0.1", "localhost", "::1")
    if parsed.scheme != "https" and not (parsed.scheme == "http" and loopback):
        raise DownloadError(f"refusing to download over {parsed.scheme or 'no scheme'}: {url} (HTTPS only)")


def download_verified(url: str, digest_prefix: str, directory: str, algorithm: str = "sha256",
                      timeout: float = 60.0) -> str:
    """Return ``directory/<file name of url>`` whose ``algorithm`` digest starts with ``digest_prefix``.

    A present file is reused when its digest is right and replaced when it is not. The download
    goes to a temporary file beside the destination and is renamed into place only after its size
    and digest check out; on any failure nothing is left behind and the error names the URL and
    the path where a manually downloaded file can be placed.
    """
    check_url(url)
    dest = os.path.join(directory, os.path.basename(urllib.parse.urlparse(url).path))
    if os.path.isfile(dest):
        if file_digest(dest, algorithm).startswith(digest_prefix):
            return dest
        logger.warning("%s has the wrong %s; downloading it again", dest, algorithm)
        os.remove(dest)
    digest = hashlib.new(algorithm)
    with atomic_path(dest, suffix=".part") as part, open(part, "wb") as out:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                expected_size = response.headers.get("Content-Length")
                size = 0
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
        except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise DownloadError(f"cannot download {url} ({reason}). Without network, download it by hand "
                                f"and place it at {dest}") from None
        if expected_size is not None and size != int(expected_size):
            raise DownloadError(f"download of {url} was truncated ({size} of {expected_size} bytes)")
        if not digest.hexdigest().startswith(digest_prefix):
            raise DownloadError(f"{algorithm} of {url} is {digest.hexdigest()[:16]}..., expected "
                                f"{digest_prefix}...: the file is corrupt or was replaced; it was deleted")
    return dest
