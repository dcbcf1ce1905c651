"""Serving-side content encoders: titles and photos to unit vectors, without torch.

Each encoder reads an export folder written by ``model.export.towers``: the ONNX
file, its JSON sidecar (shapes, checksum, preprocessing) and, for text, the
tokenizer. Everything the encoder needs to know travels in that folder.
"""
from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from tokenizers import Tokenizer

from core.errors import DecodeError, ModelLoadError
from model.serving.runtime import load_session

TEXT_SIDECAR = "text_tower.json"
IMAGE_SIDECAR = "image_tower.json"
TOKENIZER_DIR = "tokenizer"
DEFAULT_BATCH_SIZE = 32
DEFAULT_MAX_PIXELS = 40_000_000


@dataclass(frozen=True)
class ImagePreprocessing:
    """How pixels must be prepared for an image tower; saved in its sidecar.

    The photo is scaled so its shorter side is ``resize_shorter`` and the
    centre ``image_size`` square is cropped (the usual 0.875 crop: no
    distortion, the product is usually centred). Values in 0..255 are then
    mapped to ``(value - mean) / std`` per RGB channel.
    """

    image_size: int
    resize_shorter: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size,
            "resize_shorter": self.resize_shorter,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ImagePreprocessing":
        mean, std = values["mean"], values["std"]
        return cls(
            image_size=int(values["image_size"]),
            resize_shorter=int(values["resize_shorter"]),
            mean=(float(mean[0]), float(mean[1]), float(mean[2])),
            std=(float(std[0]), float(std[1]), float(std[2])),
        )


# The EfficientNet-Lite0 checkpoint was converted from TensorFlow's official
# Lite weights, which were trained on (rgb - 127) / 128, not ImageNet mean/std.
EFFICIENTNET_LITE_PREPROCESSING = ImagePreprocessing(
    image_size=224, resize_shorter=256, mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0)
)


def read_sidecar(model_dir: Path, name: str) -> dict[str, Any]:
    """The JSON written next to an exported tower; ``ModelLoadError`` if absent or unreadable."""
    path = Path(model_dir) / name
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path} does not exist; build the towers first") from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path} is unreadable: {exc}") from exc


def serving_tokenizer(
    tokenizer_dir: Path, max_length: int, *, pad_token: str, pad_token_id: int
) -> Tokenizer:
    """The fast tokenizer from ``tokenizer.json``, truncating and padding to the longest text."""
    tokenizer_file = Path(tokenizer_dir) / "tokenizer.json"
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    except Exception as exc:  # the Rust tokenizer raises plain Exception
        raise ModelLoadError(f"cannot read tokenizer {tokenizer_file}: {exc}") from exc
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(pad_id=pad_token_id, pad_token=pad_token)
    return tokenizer


class TextEncoder:
    """Titles and queries to (N, dim) unit vectors with the exported text tower."""

    def __init__(self, model_dir: Path, *, intra_op_threads: int = 1) -> None:
        meta = read_sidecar(model_dir, TEXT_SIDECAR)
        try:
            self.dim = int(meta["output_dim"])
            self.max_length = int(meta["max_length"])
            self._input_names: list[str] = list(meta["input_names"])
            onnx_path, sha256 = Path(model_dir) / meta["onnx_file"], str(meta["sha256"])
            pad_token, pad_token_id = str(meta["pad_token"]), int(meta["pad_token_id"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"{model_dir}/{TEXT_SIDECAR} is incomplete: {exc!r}") from exc
        self._session = load_session(onnx_path, sha256, intra_op_threads)
        self._tokenizer = serving_tokenizer(
            Path(model_dir) / TOKENIZER_DIR,
            self.max_length,
            pad_token=pad_token,
            pad_token_id=pad_token_id,
        )

    @classmethod
    def from_dir(cls, model_dir: Path, *, intra_op_threads: int = 1) -> "TextEncoder":
        return cls(Path(model_dir), intra_op_threads=intra_op_threads)

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(B, T) int64 token ids and attention mask, padded to the longest text."""
        encodings = self._tokenizer.encode_batch(texts)
        input_ids = np.array([e.ids for e in encodings], dtype=np.int64)
        attention_mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        return input_ids, attention_mask

    def encode(self, texts: list[str], batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """(N, dim) float32 unit vectors in the order of ``texts``; an empty string still gets a vector.

        Texts are batched in order of token count and each batch is cut to its
        longest text, so a short title is not padded to a long description.
        """
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        input_ids, attention_mask = self.tokenize(list(texts))  # (N, T), padded on the right to the longest
        lengths = attention_mask.sum(axis=1)  # (N,) tokens per text
        order = np.argsort(lengths, kind="stable")
        for start in range(0, len(texts), batch_size):
            rows = order[start : start + batch_size]
            width = int(lengths[rows].max())
            feeds = dict(zip(self._input_names, (input_ids[rows, :width], attention_mask[rows, :width])))
            (embedding,) = self._session.run(None, feeds)  # (B, dim)
            out[rows] = embedding
        return out


def decode_image(
    data: bytes,
    max_pixels: int,
    preprocessing: ImagePreprocessing = EFFICIENTNET_LITE_PREPROCESSING,
) -> np.ndarray:
    """Untrusted image bytes to a (3, S, S) float32 tensor ready for the image tower.

    Raises ``DecodeError("bad_image", ...)`` for bytes PIL cannot decode
    (garbage, truncated files) and ``DecodeError("image_too_large", ...)`` when
    the header announces more than ``max_pixels`` pixels: that is checked before
    any pixel is decoded, so a small file cannot expand into gigabytes.
    """
    try:
        with warnings.catch_warnings():
            # PIL only warns between its own two limits; a warning here is a bomb.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width <= 0 or height <= 0:
                raise DecodeError("bad_image", f"image has no pixels ({width}x{height})")
            if width * height > max_pixels:
                raise DecodeError(
                    "image_too_large", f"{width}x{height} exceeds the cap of {max_pixels} pixels"
                )
            # JPEG can decode straight at 1/2, 1/4 or 1/8 scale: far cheaper for big photos.
            scale = preprocessing.resize_shorter / min(width, height)
            image.draft("RGB", (round(width * scale), round(height * scale)))
            image.load()
            image = ImageOps.exif_transpose(image).convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError("image_too_large", str(exc)) from None
    except DecodeError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error...
        raise DecodeError("bad_image", f"cannot decode image: {exc}") from None
    return _to_tensor(image, preprocessing)


def _to_tensor(image: Image.Image, preprocessing: ImagePreprocessing) -> np.ndarray:
    """Shorter side to ``resize_shorter``, centre crop, normalise: RGB -> (3, S, S)."""
    width, height = image.size
    scale = preprocessing.resize_shorter / min(width, height)
    resized = image.resize(
        (max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BICUBIC
    )
    size = preprocessing.image_size
    left = (resized.width - size) // 2
    top = (resized.height - size) // 2
    crop = resized.crop((left, top, left + size, top + size))
    pixels = np.asarray(crop, dtype=np.float32)  # (S, S, 3) in 0..255
    mean = np.asarray(preprocessing.mean, dtype=np.float32)
    std = np.asarray(preprocessing.std, dtype=np.float32)
    return np.ascontiguousarray(((pixels - mean) / std).transpose(2, 0, 1))


class ImageEncoder:
    """Photos to (N, dim) unit vectors with the exported image tower."""

    def __init__(self, model_dir: Path, *, intra_op_threads: int = 1) -> None:
        meta = read_sidecar(model_dir, IMAGE_SIDECAR)
        try:
            self.dim = int(meta["output_dim"])
            self.preprocessing = ImagePreprocessing.from_dict(meta["preprocessing"])
            self._input_name = str(meta["input_names"][0])
            onnx_path, sha256 = Path(model_dir) / meta["onnx_file"], str(meta["sha256"])
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"{model_dir}/{IMAGE_SIDECAR} is incomplete: {exc!r}") from exc
        self._session = load_session(onnx_path, sha256, intra_op_threads)

    @classmethod
    def from_dir(cls, model_dir: Path, *, intra_op_threads: int = 1) -> "ImageEncoder":
        return cls(Path(model_dir), intra_op_threads=intra_op_threads)

    def decode_image(self, data: bytes, max_pixels: int) -> np.ndarray:
        """``decode_image`` with this tower's preprocessing: bytes -> (3, S, S)."""
        return decode_image(data, max_pixels, self.preprocessing)

    def encode_pixels(self, pixels: np.ndarray, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """(N, 3, S, S) decoded images -> (N, dim) float32 unit vectors."""
        out = np.empty((len(pixels), self.dim), dtype=np.float32)
        for start in range(0, len(pixels), batch_size):
            batch = np.ascontiguousarray(pixels[start : start + batch_size], dtype=np.float32)
            (features,) = self._session.run(None, {self._input_name: batch})  # (B, dim)
            out[start : start + len(batch)] = features
        return out

    def encode(self, images: list[bytes], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        """(N, dim) unit vectors; raises ``DecodeError`` on the first bad image.

        Callers that must keep going past bad images decode each one with
        ``decode_image`` and pass the good ones to ``encode_pixels``.
        """
        if not images:
            return np.empty((0, self.dim), dtype=np.float32)
        pixels = np.stack([self.decode_image(data, max_pixels) for data in images])
        return self.encode_pixels(pixels)
