"""Turning an image reference from an event into bytes, safely.

Inline base64 is always accepted (size-capped). URIs are read only when they
point inside the configured image root (``file://`` or a plain path, no
traversal, no symlink escape) or, when enabled, over http(s).
"""
from __future__ import annotations

import http.client
import urllib.parse
import urllib.request
from pathlib import Path

from core.errors import DecodeError
from core.events import ImageRef


def read_image_bytes(
    ref: ImageRef,
    *,
    image_root: Path | None,
    allow_http: bool,
    max_bytes: int,
) -> bytes:
    data = ref.inline_bytes()
    if data is None:
        assert ref.image_uri is not None
        data = _read_uri(ref.image_uri, image_root=image_root, allow_http=allow_http,
                         max_bytes=max_bytes)
    if len(data) > max_bytes:
        raise DecodeError("image_too_large", f"{len(data)} bytes exceeds {max_bytes}")
    if not data:
        raise DecodeError("bad_image", "empty image")
    return data


def _read_uri(uri: str, *, image_root: Path | None, allow_http: bool, max_bytes: int) -> bytes:
    try:
        parsed = urllib.parse.urlparse(uri)
    except ValueError as exc:  # e.g. "http://[": an unclosed IPv6 host
        raise DecodeError("bad_image", f"{uri!r} is not a URI: {exc}") from None
    if parsed.scheme in ("http", "https"):
        if not allow_http:
            raise DecodeError(
                "image_uri_forbidden",
                "http(s) image URIs are disabled (set STREAMREC_IMAGE_ALLOW_HTTP=true)",
            )
        return _fetch_http(uri, max_bytes)
    if parsed.scheme not in ("", "file"):
        raise DecodeError("image_uri_forbidden", f"scheme {parsed.scheme!r} is not allowed")
    if image_root is None:
        raise DecodeError(
            "image_uri_forbidden", "file image URIs need STREAMREC_IMAGE_ROOT to be set"
        )
    if parsed.netloc not in ("", "localhost"):
        raise DecodeError("image_uri_forbidden", "file URIs must not name a host")
    raw_path = urllib.parse.unquote(parsed.path if parsed.scheme else uri)
    root = image_root.resolve()
    candidate = Path(raw_path)
    try:
        path = (candidate if candidate.is_absolute() else root / candidate).resolve()
        if not path.is_relative_to(root):
            raise DecodeError("image_uri_forbidden", f"{uri!r} is outside the image root")
        if not path.is_file():
            raise DecodeError("bad_image", f"no image file at {uri!r}")
        size = path.stat().st_size
        if size > max_bytes:
            raise DecodeError("image_too_large", f"{size} bytes exceeds {max_bytes}")
        return path.read_bytes()
    except (OSError, ValueError) as exc:  # a NUL byte, a name too long for the file system, ...
        raise DecodeError("bad_image", f"cannot read {uri!r}: {exc}") from None


def _fetch_http(uri: str, max_bytes: int) -> bytes:
    try:
        with urllib.request.urlopen(uri, timeout=5) as response:  # noqa: S310 (scheme checked)
            data = response.read(max_bytes + 1)
    except (OSError, http.client.HTTPException) as exc:  # InvalidURL: "http://host:port-not-a-number/"
        raise DecodeError("bad_image", f"could not fetch {uri!r}: {exc}") from None
    if len(data) > max_bytes:
        raise DecodeError("image_too_large", f"more than {max_bytes} bytes at {uri!r}")
    return data
