"""Serving-side runtime: checksum-verified sessions, provider choice, safe image decoding."""
from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from PIL import Image

from core.errors import DecodeError, ModelLoadError
from model.serving.content import (
    EFFICIENTNET_LITE_PREPROCESSING,
    ImageEncoder,
    TextEncoder,
    decode_image,
)
from model.serving.runtime import available_providers, file_sha256, load_session

CAP = 40_000_000
REPO_ROOT = Path(__file__).resolve().parents[2]


def test_serving_modules_do_not_import_torch() -> None:
    probe = (
        "import sys, model.serving.content, model.serving.runtime; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, check=True)


@pytest.fixture()
def doubling_model(tmp_path: Path) -> Path:
    """A real one-node ONNX model: y = x + x, (N, 4) float32."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "doubling", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "doubling.onnx"
    onnx.save(model, str(path))
    return path


def test_load_session_runs_a_verified_model(doubling_model: Path) -> None:
    session = load_session(doubling_model, file_sha256(doubling_model))
    (y,) = session.run(None, {"x": np.ones((3, 4), np.float32)})
    np.testing.assert_array_equal(y, np.full((3, 4), 2.0, np.float32))
    assert "CPUExecutionProvider" in session.get_providers()


def test_checksum_mismatch_raises_model_load_error(doubling_model: Path) -> None:
    with pytest.raises(ModelLoadError, match="SHA-256"):
        load_session(doubling_model, "0" * 64)


def test_missing_model_file_raises_model_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_session(tmp_path / "absent.onnx", None)


def test_corrupt_model_file_raises_model_load_error(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.onnx"
    path.write_bytes(b"this is not a protobuf" * 10)
    # The checksum matches, so it is onnxruntime that must refuse the file.
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_session(path, file_sha256(path))


def test_provider_choice_prefers_cuda_and_falls_back_to_cpu() -> None:
    assert available_providers(["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert available_providers(["AzureExecutionProvider", "CPUExecutionProvider"]) == [
        "CPUExecutionProvider"
    ]
    assert available_providers([]) == ["CPUExecutionProvider"]
    chosen = available_providers()
    assert chosen[-1] == "CPUExecutionProvider"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert chosen == ["CPUExecutionProvider"]


def test_encoders_refuse_a_folder_without_an_export(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="build the towers"):
        TextEncoder.from_dir(tmp_path)
    with pytest.raises(ModelLoadError, match="build the towers"):
        ImageEncoder.from_dir(tmp_path)


# --- image decoding ------------------------------------------------------------------


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    checksum = struct.pack(">I", zlib.crc32(kind + payload))
    return struct.pack(">I", len(payload)) + kind + payload + checksum


def one_bit_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG built row by row: huge images stay a few KB."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", data)
        + _png_chunk(b"IEND", b"")
    )


def jpeg_bytes(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_decode_image_gives_normalised_tensor() -> None:
    pixels = decode_image(jpeg_bytes(640, 480), CAP)
    assert pixels.shape == (3, 224, 224)
    assert pixels.dtype == np.float32
    # (0 - 127) / 128 .. (255 - 127) / 128
    assert pixels.min() >= -127 / 128 - 1e-6
    assert pixels.max() <= 1.0 + 1e-6


def test_decode_image_maps_a_known_colour_exactly() -> None:
    red = Image.new("RGB", (300, 500), (255, 0, 127))
    pixels = decode_image(encoded(red, "PNG"), CAP)
    mean, std = EFFICIENTNET_LITE_PREPROCESSING.mean, EFFICIENTNET_LITE_PREPROCESSING.std
    expected = [(255 - mean[0]) / std[0], (0 - mean[1]) / std[1], (127 - mean[2]) / std[2]]
    np.testing.assert_allclose(pixels.mean(axis=(1, 2)), expected, atol=1e-5)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "1", "I;16"])
def test_decode_image_accepts_other_modes_and_small_sizes(mode: str) -> None:
    image = Image.new(mode, (50, 20))
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    pixels = decode_image(encoded(image, fmt), CAP)
    assert pixels.shape == (3, 224, 224)
    assert np.isfinite(pixels).all()


@pytest.mark.parametrize("data", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_decode_image_rejects_garbage(data: bytes) -> None:
    with pytest.raises(DecodeError) as error:
        decode_image(data, CAP)
    assert error.value.reason == "bad_image"


def test_decode_image_rejects_truncated_jpeg() -> None:
    data = jpeg_bytes(400, 300)
    with pytest.raises(DecodeError) as error:
        decode_image(data[: len(data) // 2], CAP)
    assert error.value.reason == "bad_image"


def test_decode_image_rejects_decompression_bomb() -> None:
    bomb = one_bit_png(20_000, 20_000)  # 400 megapixels in a few tens of KB
    assert len(bomb) < 1_000_000
    with pytest.raises(DecodeError) as error:
        decode_image(bomb, CAP)
    assert error.value.reason == "image_too_large"


def test_decode_image_treats_pil_bomb_warning_as_error() -> None:
    # 100 megapixels: above PIL's warning limit but below its error limit, and
    # the caller's cap is set so high that only PIL's warning can stop it.
    data = one_bit_png(10_000, 10_000)
    with pytest.raises(DecodeError) as error:
        decode_image(data, 10**12)
    assert error.value.reason == "image_too_large"


def test_decode_image_checks_the_cap_before_decoding_pixels() -> None:
    # Header says 3000x3000, the pixel data is garbage: only a header-first check
    # reports the size rather than a decode failure.
    header = struct.pack(">IIBBBBB", 3000, 3000, 8, 2, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", b"garbage")
        + _png_chunk(b"IEND", b"")
    )
    with pytest.raises(DecodeError) as error:
        decode_image(data, max_pixels=1_000_000)
    assert error.value.reason == "image_too_large"
    at_cap = encoded(Image.new("RGB", (1000, 1000)), "PNG")
    assert decode_image(at_cap, max_pixels=1_000_000).shape == (3, 224, 224)
