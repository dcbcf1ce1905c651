"""Export the frozen text and image towers to ONNX, verified against torch.

Each tower gets its own folder: the ONNX file, a JSON sidecar (what serving
needs to know: names, sizes, checksum, preprocessing, measured parity) and, for
text, the tokenizer files. Serving then needs neither torch nor HF weights.

    python -m model.export.towers OUT_DIR [--text-encoder PATH] [--force]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.errors import ModelLoadError
from model.export.image_tower import (
    IMAGE_ENCODER_NAME,
    PREPROCESSING,
    default_image_weights_path,
    load_image_tower,
)
from model.export.text_tower import (
    DEFAULT_ENCODER_NAME,
    MAX_TEXT_TOKENS,
    default_text_encoder_path,
    load_text_tower,
)
from model.serving.content import (
    IMAGE_SIDECAR,
    TEXT_SIDECAR,
    TOKENIZER_DIR,
    serving_tokenizer,
)
from model.serving.runtime import file_sha256, load_session

SIDECAR_FORMAT = 1
OPSET = 17
PARITY_TOLERANCE = 1e-4
TEXT_ONNX = "text_tower.onnx"
IMAGE_ONNX = "image_tower.onnx"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
TOKENIZER_FILE = f"{TOKENIZER_DIR}/tokenizer.json"

# Varied lengths so parity covers padding, an empty title and truncation.
PARITY_TEXTS = [
    "red running shoes",
    "",
    "Stainless steel saucepan with glass lid, 2 litre, induction ready",
    "LEGO Star Wars Millennium Falcon building kit " * 40,
]


def _source_fingerprint(paths: list[Path]) -> str:
    """SHA-256 over the files a tower is built from, so a changed encoder re-exports."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def _text_sources(encoder_path: Path) -> list[Path]:
    weights = [p for p in encoder_path.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file()]
    return [encoder_path / "config.json", *weights]


def _unfinished(path: Path) -> Path:
    """Where to write before renaming; per process, so concurrent builds cannot mix files."""
    return path.with_name(f"{path.name}.{os.getpid()}.partial")


def _export_onnx(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
) -> None:
    """TorchScript-based exporter: one self-contained file, dynamic axes as named."""
    unfinished = _unfinished(path)
    with torch.no_grad(), warnings.catch_warnings():
        # Tracing warnings about constant shapes and index ops are expected here;
        # the parity check that follows every export is the real guard.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        torch.onnx.export(
            module,
            args,
            str(unfinished),
            input_names=input_names,
            output_names=["embedding"],
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    os.replace(unfinished, path)  # a crash mid-export never leaves a plausible file


def _check_parity(expected: np.ndarray, actual: np.ndarray, what: str) -> float:
    diff = float(np.max(np.abs(expected - actual)))
    if not diff <= PARITY_TOLERANCE:  # also catches NaN
        raise ModelLoadError(
            f"exported {what} differs from torch by {diff:.2e} (> {PARITY_TOLERANCE:.0e})"
        )
    return diff


def _write_sidecar(path: Path, meta: dict[str, Any]) -> None:
    unfinished = _unfinished(path)
    unfinished.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(unfinished, path)  # written last: its presence means the export completed


def export_text_tower(out_dir: Path, encoder_path: Path | None = None) -> Path:
    """Export the text tower and its tokenizer into ``out_dir``; returns the ONNX path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    encoder_path = (Path(encoder_path) if encoder_path else default_text_encoder_path()).resolve()
    tower, tokenizer = load_text_tower(encoder_path)
    onnx_path = out_dir / TEXT_ONNX
    input_names = ["input_ids", "attention_mask"]
    sample = tokenizer(PARITY_TEXTS[:2], padding=True, return_tensors="pt")
    _export_onnx(
        tower,
        (sample["input_ids"], sample["attention_mask"]),
        onnx_path,
        input_names,
        {name: {0: "batch", 1: "sequence"} for name in input_names} | {"embedding": {0: "batch"}},
    )
    tokenizer.save_pretrained(str(out_dir / TOKENIZER_DIR))

    batch = tokenizer(
        PARITY_TEXTS, padding=True, truncation=True, max_length=MAX_TEXT_TOKENS, return_tensors="np"
    )
    # Serving tokenizes with the bare ``tokenizers`` library: it must give the same ids.
    served = serving_tokenizer(
        out_dir / TOKENIZER_DIR,
        MAX_TEXT_TOKENS,
        pad_token=tokenizer.pad_token,
        pad_token_id=int(tokenizer.pad_token_id),
    ).encode_batch(PARITY_TEXTS)
    if [encoding.ids for encoding in served] != batch["input_ids"].tolist():
        raise ModelLoadError(f"the tokenizer saved from {encoder_path} does not reproduce its ids")
    feeds = {name: batch[name].astype(np.int64) for name in input_names}
    with torch.no_grad():
        expected = tower(*(torch.from_numpy(feeds[name]) for name in input_names)).numpy()
    (actual,) = load_session(onnx_path, None).run(None, feeds)
    diff = _check_parity(expected, actual, "text tower")

    default = encoder_path == default_text_encoder_path().resolve()
    _write_sidecar(
        out_dir / TEXT_SIDECAR,
        {
            "format": SIDECAR_FORMAT,
            "kind": "text_tower",
            "encoder": DEFAULT_ENCODER_NAME if default else encoder_path.name,
            "encoder_path": str(encoder_path),
            "source_fingerprint": _source_fingerprint(_text_sources(encoder_path)),
            "onnx_file": TEXT_ONNX,
            "sha256": file_sha256(onnx_path),
            "opset": OPSET,
            "input_names": input_names,
            "output_name": "embedding",
            "output_dim": tower.dim,
            "max_length": MAX_TEXT_TOKENS,
            "pad_token": tokenizer.pad_token,
            "pad_token_id": int(tokenizer.pad_token_id),
            "parity_max_abs_diff": diff,
        },
    )
    return onnx_path


def export_image_tower(out_dir: Path, weights_path: Path | None = None) -> Path:
    """Export the image tower into ``out_dir``; returns the ONNX path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights_path = (Path(weights_path) if weights_path else default_image_weights_path()).resolve()
    tower = load_image_tower(weights_path)
    onnx_path = out_dir / IMAGE_ONNX
    size = PREPROCESSING.image_size
    generator = torch.Generator().manual_seed(0)
    # Normalised pixels lie roughly in [-1, 1]: (B, 3, S, S).
    sample = torch.rand(2, 3, size, size, generator=generator) * 2 - 1
    dynamic_axes = {"pixels": {0: "batch"}, "embedding": {0: "batch"}}
    _export_onnx(tower, (sample,), onnx_path, ["pixels"], dynamic_axes)

    check = (torch.rand(3, 3, size, size, generator=generator) * 2 - 1).numpy()
    with torch.no_grad():
        expected = tower(torch.from_numpy(check)).numpy()
    (actual,) = load_session(onnx_path, None).run(None, {"pixels": check})
    diff = _check_parity(expected, actual, "image tower")

    _write_sidecar(
        out_dir / IMAGE_SIDECAR,
        {
            "format": SIDECAR_FORMAT,
            "kind": "image_tower",
            "encoder": IMAGE_ENCODER_NAME,
            "encoder_path": str(weights_path),
            "source_fingerprint": _source_fingerprint([weights_path]),
            "onnx_file": IMAGE_ONNX,
            "sha256": file_sha256(onnx_path),
            "opset": OPSET,
            "input_names": ["pixels"],
            "output_name": "embedding",
            "output_dim": tower.dim,
            "preprocessing": PREPROCESSING.to_dict(),
            "parity_max_abs_diff": diff,
        },
    )
    return onnx_path


def _is_current(out_dir: Path, sidecar_name: str, fingerprint: str) -> bool:
    """True when the folder holds a complete export of exactly these sources."""
    try:
        meta = json.loads((out_dir / sidecar_name).read_text())
        onnx_path = out_dir / meta["onnx_file"]
        return (
            meta.get("format") == SIDECAR_FORMAT
            and meta.get("opset") == OPSET
            and meta.get("source_fingerprint") == fingerprint
            and onnx_path.is_file()
            and file_sha256(onnx_path) == meta["sha256"]
            and (meta["kind"] != "text_tower" or (out_dir / TOKENIZER_FILE).is_file())
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _ensure_tower(
    folder: Path,
    sidecar_name: str,
    sources: list[Path],
    export: Callable[[Path], Path],
    force: bool,
) -> dict[str, Any]:
    exported = force or not _is_current(folder, sidecar_name, _source_fingerprint(sources))
    if exported:
        print(f"exporting the {folder.name} tower to {folder} ...", flush=True)
        export(folder)
    meta = json.loads((folder / sidecar_name).read_text())
    print(
        f"{folder.name} tower {'exported' if exported else 'up to date'}: {meta['encoder']}, "
        f"dim {meta['output_dim']}, parity {meta['parity_max_abs_diff']:.1e}",
        flush=True,
    )
    return {"dir": str(folder), "exported": exported, "sidecar": meta}


def encoder_identities(
    text_encoder_path: Path | None = None, image_weights_path: Path | None = None
) -> dict[str, dict[str, str]]:
    """Name and source fingerprint of each content encoder, as the tower sidecars record them.

    A trained artefact stores these; a worker compares them with its exported
    towers' sidecars, so a model is never served over another encoder's vectors.
    """
    text_path = (Path(text_encoder_path) if text_encoder_path else default_text_encoder_path()).resolve()
    image_path = (Path(image_weights_path) if image_weights_path else default_image_weights_path()).resolve()
    text_name = DEFAULT_ENCODER_NAME if text_path == default_text_encoder_path().resolve() else text_path.name
    return {
        "text": {"encoder": text_name, "source_fingerprint": _source_fingerprint(_text_sources(text_path))},
        "image": {"encoder": IMAGE_ENCODER_NAME, "weights": image_path.name,
                  "source_fingerprint": _source_fingerprint([image_path])},
    }


def build_towers(
    out_dir: Path,
    force: bool = False,
    text_encoder_path: Path | None = None,
    image_weights_path: Path | None = None,
) -> dict[str, dict[str, Any]]:
    """Export both towers into ``out_dir/text`` and ``out_dir/image`` unless already current.

    Idempotent: a tower is re-exported only when its sidecar is missing, its
    ONNX file no longer matches the recorded checksum, or its source weights
    changed. Returns ``{"text": {...}, "image": {...}}``, each with the folder
    (``dir``), whether it was exported by this call (``exported``) and the
    ``sidecar`` contents.
    """
    out_dir = Path(out_dir)
    encoder_path = (
        Path(text_encoder_path) if text_encoder_path else default_text_encoder_path()
    ).resolve()
    weights_path = (
        Path(image_weights_path) if image_weights_path else default_image_weights_path()
    ).resolve()
    if not weights_path.is_file():
        raise ModelLoadError(f"image encoder weights not found: {weights_path}")
    return {
        "text": _ensure_tower(
            out_dir / "text",
            TEXT_SIDECAR,
            _text_sources(encoder_path),
            partial(export_text_tower, encoder_path=encoder_path),
            force,
        ),
        "image": _ensure_tower(
            out_dir / "image",
            IMAGE_SIDECAR,
            [weights_path],
            partial(export_image_tower, weights_path=weights_path),
            force,
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--text-encoder", type=Path, default=None)
    parser.add_argument("--image-weights", type=Path, default=None,
                        help="EfficientNet-Lite0 state dict (default: the packaged ImageNet weights)")
    parser.add_argument("--force", action="store_true")
    arguments = parser.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    build_towers(arguments.out_dir, force=arguments.force, text_encoder_path=arguments.text_encoder,
                 image_weights_path=arguments.image_weights)


if __name__ == "__main__":
    main()
