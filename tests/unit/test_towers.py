"""The frozen content towers: export, torch/ONNX parity, serving encoders, semantics.

The towers are exported once per test session (about 20 s on two cores).
"""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, BertConfig, BertModel

from core.errors import ModelLoadError
from model.export.image_tower import load_image_tower
from model.export.text_tower import (
    MAX_TEXT_TOKENS,
    default_text_encoder_path,
    load_text_tower,
)
from model.export.towers import PARITY_TOLERANCE, build_towers, export_text_tower
from model.serving.content import ImageEncoder, TextEncoder, decode_image
from model.serving.runtime import file_sha256

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
CLOTHING = DATA / "clothing" / "validation"
CAP = 40_000_000

TITLES = [
    "red running shoes",
    "sneakers for jogging",
    "stainless steel saucepan",
    "",
    "Wooden train set with 40 pieces, bridges and a tunnel, for ages 3+",
    "waterproof hiking jacket " * 60,  # far past the token limit
]


@pytest.fixture(scope="session")
def towers_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("towers")
    build_towers(out)
    return out


@pytest.fixture(scope="session")
def text_encoder(towers_dir: Path) -> TextEncoder:
    return TextEncoder.from_dir(towers_dir / "text")


@pytest.fixture(scope="session")
def image_encoder(towers_dir: Path) -> ImageEncoder:
    return ImageEncoder.from_dir(towers_dir / "image")


def jpeg_bytes(width: int, height: int, seed: int) -> bytes:
    """A photo-like test image: smooth colour gradients plus some noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([np.sin(x * rng.uniform(2, 9)), np.cos(y * rng.uniform(2, 9)), x * y], axis=-1)
    pixels = (base - base.min()) / (np.ptp(base) + 1e-9) * 200 + rng.normal(0, 20, base.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_sidecars_describe_the_exports(towers_dir: Path) -> None:
    for name, dim in (("text", 384), ("image", 1280)):
        meta = json.loads((towers_dir / name / f"{name}_tower.json").read_text())
        assert meta["output_dim"] == dim
        assert meta["opset"] >= 17
        assert meta["sha256"] == file_sha256(towers_dir / name / meta["onnx_file"])
        assert 0 <= meta["parity_max_abs_diff"] <= PARITY_TOLERANCE
        assert meta["input_names"]
    text_meta = json.loads((towers_dir / "text" / "text_tower.json").read_text())
    assert text_meta["max_length"] == MAX_TEXT_TOKENS
    assert text_meta["encoder_path"] == str(default_text_encoder_path().resolve())
    assert (towers_dir / "text" / "tokenizer" / "tokenizer.json").is_file()


def test_build_towers_is_idempotent(towers_dir: Path) -> None:
    stamps = {p: p.stat().st_mtime_ns for p in towers_dir.rglob("*.onnx")}
    result = build_towers(towers_dir)
    assert not result["text"]["exported"]
    assert not result["image"]["exported"]
    assert stamps == {p: p.stat().st_mtime_ns for p in towers_dir.rglob("*.onnx")}


def test_build_towers_reexports_a_corrupted_tower(towers_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "towers"
    shutil.copytree(towers_dir, copy)
    with (copy / "image" / "image_tower.onnx").open("ab") as handle:
        handle.write(b"tampered")
    result = build_towers(copy)
    assert result["image"]["exported"]
    assert not result["text"]["exported"]
    assert ImageEncoder.from_dir(copy / "image").dim == 1280


def test_serving_refuses_a_tampered_model(towers_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "image"
    shutil.copytree(towers_dir / "image", copy)
    with (copy / "image_tower.onnx").open("r+b") as handle:
        handle.seek(1000)
        handle.write(b"\xff" * 16)
    with pytest.raises(ModelLoadError, match="SHA-256"):
        ImageEncoder.from_dir(copy)


def test_text_encoder_matches_torch_tower(text_encoder: TextEncoder) -> None:
    tower, tokenizer = load_text_tower()
    batch = tokenizer(
        TITLES, padding=True, truncation=True, max_length=MAX_TEXT_TOKENS, return_tensors="pt"
    )
    with torch.no_grad():
        expected = tower(batch["input_ids"], batch["attention_mask"]).numpy()
    served = text_encoder.encode(TITLES)
    assert served.shape == (len(TITLES), 384)
    assert served.dtype == np.float32
    assert np.max(np.abs(served - expected)) <= PARITY_TOLERANCE


def test_text_vectors_are_unit_length_even_for_empty_text(text_encoder: TextEncoder) -> None:
    vectors = text_encoder.encode(TITLES)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert text_encoder.encode([]).shape == (0, text_encoder.dim)


def test_text_vector_does_not_depend_on_batch_or_padding(text_encoder: TextEncoder) -> None:
    alone = text_encoder.encode(["red running shoes"])
    padded = text_encoder.encode(["red running shoes", TITLES[4]], batch_size=2)
    split = text_encoder.encode(TITLES, batch_size=2)
    np.testing.assert_allclose(alone[0], padded[0], atol=1e-5)
    np.testing.assert_allclose(split, text_encoder.encode(TITLES), atol=1e-5)


def test_texts_are_batched_by_length_and_come_back_in_order(
    text_encoder: TextEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = [TITLES[5], TITLES[0], TITLES[4], TITLES[3], TITLES[1], TITLES[2]]  # long and short mixed
    alone = np.concatenate([text_encoder.encode([text]) for text in texts])
    tokens = sorted(int(text_encoder.tokenize([text])[1].sum()) for text in texts)
    widths: list[int] = []
    session = text_encoder._session

    class Recording:
        def run(self, outputs: None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            widths.append(feeds["input_ids"].shape[1])
            return session.run(outputs, feeds)

    monkeypatch.setattr(text_encoder, "_session", Recording())
    np.testing.assert_allclose(text_encoder.encode(texts, batch_size=2), alone, atol=1e-5)
    # Batches of two in order of token count, each cut to its own longest text.
    assert widths == [max(tokens[0:2]), max(tokens[2:4]), max(tokens[4:6])]
    assert widths[0] < widths[-1] == MAX_TEXT_TOKENS


def test_long_text_is_truncated(text_encoder: TextEncoder) -> None:
    input_ids, attention_mask = text_encoder.tokenize([TITLES[-1]])
    assert input_ids.shape == (1, MAX_TEXT_TOKENS)
    assert attention_mask.sum() == MAX_TEXT_TOKENS


def test_text_similarity_follows_meaning(text_encoder: TextEncoder) -> None:
    shoes, sneakers, saucepan = text_encoder.encode(TITLES[:3])
    assert shoes @ sneakers > shoes @ saucepan + 0.2


def test_any_local_encoder_folder_can_be_exported(tmp_path: Path) -> None:
    # A tiny randomly initialised BERT stands in for a swapped-in encoder.
    encoder_dir = tmp_path / "tiny-encoder"
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    BertModel(config).save_pretrained(str(encoder_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(default_text_encoder_path()))
    tokenizer.save_pretrained(str(encoder_dir))
    export_text_tower(tmp_path / "text", encoder_path=encoder_dir)
    encoder = TextEncoder.from_dir(tmp_path / "text")
    assert encoder.dim == 32
    tower, tokenizer = load_text_tower(encoder_dir)
    batch = tokenizer(TITLES[:3], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = tower(batch["input_ids"], batch["attention_mask"]).numpy()
    assert np.max(np.abs(encoder.encode(TITLES[:3]) - expected)) <= PARITY_TOLERANCE


def test_image_encoder_matches_torch_tower(image_encoder: ImageEncoder) -> None:
    images = [jpeg_bytes(640, 480, seed) for seed in range(3)]
    pixels = np.stack([decode_image(data, CAP) for data in images])  # (3, 3, 224, 224)
    with torch.no_grad():
        expected = load_image_tower()(torch.from_numpy(pixels)).numpy()
    served = image_encoder.encode(images)
    assert served.shape == (3, 1280)
    assert served.dtype == np.float32
    assert np.max(np.abs(served - expected)) <= PARITY_TOLERANCE
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(image_encoder.encode_pixels(pixels, batch_size=2), served, atol=1e-5)


def test_clothing_photos_neighbour_their_own_class(image_encoder: ImageEncoder) -> None:
    if not CLOTHING.is_dir():
        pytest.skip(f"clothing photos not found at {CLOTHING} (shared data is optional)")
    paths = sorted(CLOTHING.glob("*/*.jpg"))
    labels = np.array([path.parent.name for path in paths])
    vectors = image_encoder.encode([path.read_bytes() for path in paths])  # (N, 1280) unit rows
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -np.inf)  # leave one out
    agreement = float(np.mean(labels[similarity.argmax(axis=1)] == labels))
    print(f"clothing leave-one-out 1-NN class agreement: {agreement:.3f} over {len(paths)} photos")
    assert len(set(labels)) == 10
    assert agreement >= 0.5  # chance is about 0.1
