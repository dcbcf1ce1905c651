"""onnxruntime sessions for serving: provider choice and checksum-verified loading.

Serving imports this module, never torch: every model reaches a worker as an
ONNX file whose SHA-256 was recorded when it was exported.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import onnxruntime as ort

from core.errors import ModelLoadError

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


def available_providers(present: Sequence[str] | None = None) -> list[str]:
    """Execution providers to ask for, best first; CPU is always the last resort.

    ``present`` defaults to what the installed onnxruntime offers. Listing CUDA
    with CPU behind it lets onnxruntime place on CPU whatever CUDA cannot run.
    """
    offered = ort.get_available_providers() if present is None else list(present)
    return ([CUDA_PROVIDER] if CUDA_PROVIDER in offered else []) + [CPU_PROVIDER]


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks so large models stay out of memory."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_session(
    path: Path, expected_sha256: str | None, intra_op_threads: int = 1
) -> ort.InferenceSession:
    """Open an ONNX model after checking that it is the file that was exported.

    Raises ``ModelLoadError`` when the file is missing, its checksum differs from
    ``expected_sha256`` (skipped when None), or onnxruntime cannot parse it.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist; export it first")
    if expected_sha256 is not None:
        actual = file_sha256(path)
        if actual != expected_sha256.lower():
            raise ModelLoadError(
                f"model file {path} has SHA-256 {actual}, expected {expected_sha256}: "
                "it is corrupt or was replaced; export it again"
            )
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only; provider fallbacks are expected
    providers = available_providers()
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own unrelated exception types
        if providers != [CPU_PROVIDER]:
            # A GPU build without a usable GPU can fail at session creation.
            try:
                return ort.InferenceSession(
                    str(path), sess_options=options, providers=[CPU_PROVIDER]
                )
            except Exception:
                pass
        raise ModelLoadError(f"onnxruntime cannot load {path}: {exc}") from exc
