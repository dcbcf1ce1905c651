"""Reading image references safely: inline base64, files under the image root, http(s).

Only the loopback interface is used (a local HTTP server in a thread); nothing
leaves the machine.
"""
from __future__ import annotations

import base64
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.errors import DecodeError
from core.events import ImageRef
from stream.images import read_image_bytes

PHOTO = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4  # content is never decoded here
MAX_BYTES = 1 << 20


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    (root / "shoes").mkdir(parents=True)
    (root / "shoes" / "red.png").write_bytes(PHOTO)
    (tmp_path / "secret.txt").write_bytes(b"do not serve me")
    return root


def read(ref: ImageRef, root: Path | None, *, allow_http: bool = False, max_bytes: int = MAX_BYTES) -> bytes:
    return read_image_bytes(ref, image_root=root, allow_http=allow_http, max_bytes=max_bytes)


def reason(ref: ImageRef, root: Path | None, **options: object) -> str:
    with pytest.raises(DecodeError) as caught:
        read(ref, root, **options)  # type: ignore[arg-type]
    return caught.value.reason


def uri(value: str) -> ImageRef:
    return ImageRef(image_uri=value)


# --- inline ------------------------------------------------------------------


def test_inline_base64_is_accepted_without_a_root() -> None:
    ref = ImageRef(image_b64=base64.b64encode(PHOTO).decode())
    assert read(ref, None) == PHOTO


def test_bad_base64_is_a_bad_image() -> None:
    assert reason(ImageRef(image_b64="this is not base64!"), None) == "bad_image"
    assert reason(ImageRef(image_b64="QUJDRA"), None) == "bad_image"  # padding missing


def test_inline_image_over_the_limit_is_too_large() -> None:
    ref = ImageRef(image_b64=base64.b64encode(PHOTO).decode())
    assert reason(ref, None, max_bytes=len(PHOTO) - 1) == "image_too_large"
    assert read(ref, None, max_bytes=len(PHOTO)) == PHOTO


def test_empty_inline_image_is_a_bad_image() -> None:
    assert reason(ImageRef(image_b64="===="), None) == "bad_image"


# --- files under the root ----------------------------------------------------


def test_file_uri_inside_the_root_is_accepted(image_root: Path) -> None:
    path = image_root / "shoes" / "red.png"
    assert read(uri(path.as_uri()), image_root) == PHOTO
    assert read(uri(f"file://localhost{path}"), image_root) == PHOTO


def test_plain_paths_inside_the_root_are_accepted(image_root: Path) -> None:
    assert read(uri("shoes/red.png"), image_root) == PHOTO
    assert read(uri(str(image_root / "shoes" / "red.png")), image_root) == PHOTO
    assert read(uri("shoes/../shoes/red.png"), image_root) == PHOTO


def test_percent_encoded_names_are_decoded(image_root: Path) -> None:
    (image_root / "blue shoe.png").write_bytes(PHOTO)
    assert read(uri((image_root / "blue shoe.png").as_uri()), image_root) == PHOTO


def test_symlink_that_stays_inside_the_root_is_accepted(image_root: Path) -> None:
    (image_root / "alias.png").symlink_to(image_root / "shoes" / "red.png")
    assert read(uri("alias.png"), image_root) == PHOTO


@pytest.mark.parametrize(
    "reference",
    [
        "../secret.txt",
        "shoes/../../secret.txt",
        "{root}/../secret.txt",
        "file://{root}/../secret.txt",
        "file://{root}/%2e%2e/secret.txt",
        "/etc/passwd",
        "file:///etc/passwd",
    ],
)
def test_paths_outside_the_root_are_forbidden(image_root: Path, reference: str) -> None:
    assert reason(uri(reference.format(root=image_root)), image_root) == "image_uri_forbidden"


def test_sibling_folder_sharing_the_root_prefix_is_forbidden(image_root: Path) -> None:
    sibling = image_root.parent / (image_root.name + "-private")
    sibling.mkdir()
    (sibling / "x.png").write_bytes(PHOTO)
    assert reason(uri((sibling / "x.png").as_uri()), image_root) == "image_uri_forbidden"


def test_symlink_escaping_the_root_is_forbidden(image_root: Path) -> None:
    (image_root / "escape.png").symlink_to(image_root.parent / "secret.txt")
    (image_root / "outside").symlink_to(image_root.parent, target_is_directory=True)
    assert reason(uri("escape.png"), image_root) == "image_uri_forbidden"
    assert reason(uri((image_root / "escape.png").as_uri()), image_root) == "image_uri_forbidden"
    assert reason(uri("outside/secret.txt"), image_root) == "image_uri_forbidden"


@pytest.mark.parametrize(
    "reference",
    [
        "ftp://example.com/a.png",
        "data:image/png;base64,iVBORw0KGgo=",
        "gopher://example.com/a",
        "s3://bucket/a.png",
        "javascript:alert(1)",
    ],
)
def test_other_schemes_are_forbidden(image_root: Path, reference: str) -> None:
    assert reason(uri(reference), image_root) == "image_uri_forbidden"


def test_file_uri_naming_a_host_is_forbidden(image_root: Path) -> None:
    remote = f"file://fileserver{image_root}/shoes/red.png"
    assert reason(uri(remote), image_root) == "image_uri_forbidden"


def test_files_need_a_root() -> None:
    assert reason(uri("shoes/red.png"), None) == "image_uri_forbidden"
    assert reason(uri("file:///etc/hostname"), None) == "image_uri_forbidden"


def test_missing_file_or_folder_inside_the_root_is_a_bad_image(image_root: Path) -> None:
    assert reason(uri("shoes/blue.png"), image_root) == "bad_image"
    assert reason(uri("shoes"), image_root) == "bad_image"


def test_empty_file_is_a_bad_image(image_root: Path) -> None:
    (image_root / "empty.png").write_bytes(b"")
    assert reason(uri("empty.png"), image_root) == "bad_image"


def test_file_over_the_limit_is_too_large(image_root: Path) -> None:
    assert reason(uri("shoes/red.png"), image_root, max_bytes=len(PHOTO) - 1) == "image_too_large"


# --- http(s) -------------------------------------------------------------------


@pytest.mark.parametrize("reference", ["http://127.0.0.1:1/a.png", "https://images.example.com/a.png"])
def test_http_is_forbidden_unless_enabled(image_root: Path, reference: str) -> None:
    assert reason(uri(reference), image_root) == "image_uri_forbidden"


class _PhotoHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path != "/red.png":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(PHOTO)))
        self.end_headers()
        self.wfile.write(PHOTO)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def photo_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _PhotoHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_http_when_enabled_reads_the_photo(photo_server: str) -> None:
    assert read(uri(f"{photo_server}/red.png"), None, allow_http=True) == PHOTO


def test_http_photo_over_the_limit_is_too_large(photo_server: str) -> None:
    ref = uri(f"{photo_server}/red.png")
    assert reason(ref, None, allow_http=True, max_bytes=len(PHOTO) - 1) == "image_too_large"


def test_http_error_is_a_bad_image(photo_server: str) -> None:
    assert reason(uri(f"{photo_server}/missing.png"), None, allow_http=True) == "bad_image"


# --- URIs that cannot be read at all: a reason, never an exception (found by fuzzing POST /recommend) ----


@pytest.mark.parametrize("reference", ["http://[", "file://[::1/x.png", "[::1"])
def test_unparseable_uri_is_a_bad_image(image_root: Path, reference: str) -> None:
    assert reason(uri(reference), image_root, allow_http=True) == "bad_image"
    assert reason(uri(reference), None) in ("bad_image", "image_uri_forbidden")


@pytest.mark.parametrize("reference", ["shoes/red\x00.png", "shoes/" + "x" * 300 + ".png"])
def test_unreadable_path_inside_the_root_is_a_bad_image(image_root: Path, reference: str) -> None:
    assert reason(uri(reference), image_root) == "bad_image"


@pytest.mark.parametrize("reference", ["http://127.0.0.1:port/x.png", "http://a b/x.png"])
def test_invalid_http_url_is_a_bad_image(reference: str) -> None:
    assert reason(uri(reference), None, allow_http=True) == "bad_image"
