"""Export the item tower, user tower and ranker to ONNX and check them.

Every network is exported with dynamic batch (and sequence) axes, then run in
onnxruntime on fresh random inputs of other sizes and compared with its torch
twin: the largest absolute difference must stay under ``tolerance``. The int8
option writes dynamically quantised copies (``*.int8.onnx``) beside the float
ones and prints what they cost in accuracy and gain in latency.

Re-export an artefact from its weights: ``python -m model.export.fused DIR [--int8]``.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import time
import warnings
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from core.errors import ModelLoadError
from model.nets.towers import ItemTower, Ranker, UserTower
from model.serving.artefact import MANIFEST, read_manifest, write_manifest
from model.serving.contract import ACTIONS
from model.serving.networks import INPUT_NAMES, NETWORKS, OUTPUT_NAMES, TowerConfig
from model.serving.ranker_parts import FILE_NAME as RANKER_PARTS_FILE
from model.serving.ranker_parts import RankerParts

DEFAULT_TOLERANCE = 1e-4
OPSET = 17
EXPORTERS: tuple[str, ...] = ("torchscript", "dynamo")


@dataclass
class Networks:
    """The three trained modules and the config they were built from."""

    config: TowerConfig
    item_tower: ItemTower
    user_tower: UserTower
    ranker: Ranker

    def module(self, name: str) -> nn.Module:
        return {"item_tower": self.item_tower, "user_tower": self.user_tower, "ranker": self.ranker}[name]

    def state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        return {name: self.module(name).state_dict() for name in NETWORKS}

    @classmethod
    def build(cls, config: TowerConfig) -> "Networks":
        return cls(config, ItemTower(config), UserTower(config), Ranker(config))

    @classmethod
    def load(cls, directory: Path) -> "Networks":
        """Rebuild from an artefact's ``config.json`` and ``weights.pt`` (trainer side only)."""
        try:
            config = TowerConfig.from_dict(json.loads((directory / "config.json").read_text())["tower"])
            states = torch.load(directory / "weights.pt", map_location="cpu", weights_only=True)
        except (OSError, KeyError, ValueError, RuntimeError) as error:
            raise ModelLoadError(f"cannot load weights from {directory}: {error}") from error
        networks = cls.build(config)
        for name in NETWORKS:
            networks.module(name).load_state_dict(states[name])
        return networks


def example_inputs(name: str, config: TowerConfig, size: int, length: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Random but valid inputs for one network: ``size`` rows, sequences of ``length``."""
    generator = torch.Generator().manual_seed(seed)
    d, t, i = config.fused_dim, config.text_dim, config.image_dim

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    def flags() -> torch.Tensor:
        return (torch.rand(size, generator=generator) > 0.5).to(torch.float32)

    if name == "item_tower":
        index = torch.randint(0, config.n_items + 1, (size,), generator=generator)
        attributes = torch.randint(0, config.n_attributes + 1, (size, config.max_attributes), generator=generator)
        return index, attributes, normal(size, t), normal(size, i), flags(), flags()
    if name == "user_tower":
        actions = torch.randint(1, len(ACTIONS), (size, length), generator=generator)
        for row in range(size):
            # Left padding of varying width, including none and almost all.
            actions[row, : row % length] = 0
        vectors = normal(size, length, d) * (actions > 0).unsqueeze(-1)
        return vectors, actions
    context = torch.stack(
        [torch.rand(size, generator=generator) * 8, torch.rand(size, generator=generator) * 30, normal(size) * 5],
        dim=1,
    )
    unit_text = nn.functional.normalize(normal(size, t), dim=-1)
    unit_query = nn.functional.normalize(normal(size, t), dim=-1)
    return normal(size, d), normal(size, d), unit_text, normal(size, i).abs(), unit_query, context


def _dynamic_axes(name: str) -> dict[str, dict[int, str]]:
    """Rows are dynamic everywhere; so are sequence length and attribute slots."""
    axes = {input_name: {0: "rows"} for input_name in INPUT_NAMES[name]}
    if name == "user_tower":
        axes = {input_name: {0: "rows", 1: "length"} for input_name in INPUT_NAMES[name]}
    if name == "item_tower":
        axes["attributes"] = {0: "rows", 1: "attribute_slots"}
    axes[OUTPUT_NAMES[name]] = {0: "rows"}
    return axes


def _dynamic_shapes(name: str, config: TowerConfig) -> dict[str, dict[int, object]]:
    rows = torch.export.Dim("rows")
    if name == "user_tower":
        length = torch.export.Dim("length", max=config.max_sequence)
        return {"item_vectors": {0: rows, 1: length}, "actions": {0: rows, 1: length}}
    shapes: dict[str, dict[int, object]] = {input_name: {0: rows} for input_name in INPUT_NAMES[name]}
    if name == "item_tower":
        shapes["attributes"] = {0: rows, 1: torch.export.Dim("attribute_slots")}
    return shapes


def export_network(networks: Networks, name: str, path: Path, exporter: str = "torchscript") -> None:
    """Write one network as a self-contained ONNX file (weights inside).

    ``torchscript`` (default) traces in well under a second; ``dynamo`` goes
    through ``torch.export`` and takes tens of seconds per network on a small
    CPU. Both produce graphs that pass the same parity checks.
    """
    module = networks.module(name).eval()
    inputs = example_inputs(name, networks.config, size=4, length=min(5, networks.config.max_sequence), seed=0)
    # The exporters narrate every stage; keep the console for the caller's output.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            torch.onnx.export(
                module, inputs, str(path),
                input_names=list(INPUT_NAMES[name]), output_names=[OUTPUT_NAMES[name]],
                dynamic_shapes=_dynamic_shapes(name, networks.config), external_data=False, verbose=False,
            )
        else:
            torch.onnx.export(
                module, inputs, str(path), dynamo=False, opset_version=OPSET,
                input_names=list(INPUT_NAMES[name]), output_names=[OUTPUT_NAMES[name]],
                dynamic_axes=_dynamic_axes(name),
            )


def session(path: Path, threads: int = 1) -> ort.InferenceSession:
    """An onnxruntime session on CUDA when that provider is present, else CPU."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    available = ort.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as error:  # onnxruntime raises its own unrelated exception types
        raise ModelLoadError(f"cannot open ONNX model {path}: {error}") from error


def parity(networks: Networks, name: str, path: Path, size: int = 37, length: int | None = None) -> float:
    """Largest |onnx - torch| on inputs of a size the export never saw."""
    length = length or networks.config.max_sequence
    inputs = example_inputs(name, networks.config, size=size, length=length, seed=1)
    with torch.no_grad():
        expected = networks.module(name).eval()(*inputs).numpy()
    feeds = {key: value.numpy() for key, value in zip(INPUT_NAMES[name], inputs)}
    actual = session(path).run(None, feeds)[0]
    if actual.shape != expected.shape or not np.isfinite(actual).all():
        return float("inf")
    return float(np.abs(actual - expected).max())


def export_all(
    networks: Networks, directory: Path, tolerance: float = DEFAULT_TOLERANCE, exporter: str = "torchscript"
) -> dict[str, float]:
    """Export the three networks into ``directory``; returns each one's parity error."""
    errors: dict[str, float] = {}
    for name in NETWORKS:
        path = directory / f"{name}.onnx"
        export_network(networks, name, path, exporter)
        errors[name] = max(parity(networks, name, path), parity(networks, name, path, size=3, length=1))
        if not errors[name] <= tolerance:
            raise ModelLoadError(f"{name}.onnx differs from torch by {errors[name]:.2e} > {tolerance:.0e}")
    # Serving scores with the ranker split into a per-item part and the rest
    # (model.serving.ranker_parts); the export refuses a split that differs.
    export_ranker_parts(networks, directory, tolerance)
    return errors


def ranker_weights(ranker: Ranker, fused_dim: int) -> dict[str, np.ndarray]:
    """The ranker's parameters and buffers as ``RankerParts`` reads them (``ranker_parts.npz``)."""
    state = {name.replace(".", "_"): value.detach().cpu().numpy().astype(np.float32)
             for name, value in ranker.state_dict().items()}
    return {**state, "fused_dim": np.asarray(fused_dim, np.int64)}


def export_ranker_parts(networks: Networks, directory: Path, tolerance: float = DEFAULT_TOLERANCE,
                        size: int = 37) -> float:
    """Write ``ranker_parts.npz``; the largest |split - onnx| over random inputs (with and without a query)."""
    path = directory / RANKER_PARTS_FILE
    np.savez(path, **ranker_weights(networks.ranker, networks.config.fused_dim))
    parts = RankerParts.load(path)
    onnx_ranker = session(directory / "ranker.onnx")
    error = 0.0
    for seed, with_query in ((3, True), (4, False)):
        user, fused, text, image, query, context = (
            x.numpy() for x in example_inputs("ranker", networks.config, size=size, length=1, seed=seed))
        if not with_query:
            query = np.zeros_like(query)
        user, query = np.repeat(user[:1], size, 0), np.repeat(query[:1], size, 0)
        feeds = dict(zip(INPUT_NAMES["ranker"], (user, fused, text, image, query, context)))
        expected = onnx_ranker.run(None, feeds)[0]
        split = parts.score(user[0], query[0] if with_query else None, fused, parts.item_part(fused, text, image),
                            text if with_query else None, context)
        error = max(error, float(np.abs(split - expected).max()))
    if not error <= tolerance:
        raise ModelLoadError(f"{RANKER_PARTS_FILE} differs from ranker.onnx by {error:.2e} > {tolerance:.0e}")
    return error


def _median_latency_seconds(model: ort.InferenceSession, feeds: dict[str, np.ndarray], repeats: int = 30) -> float:
    model.run(None, feeds)
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.run(None, feeds)
        timings.append(time.perf_counter() - start)
    return float(np.median(timings))


def quantize_int8(networks: Networks, directory: Path) -> dict[str, dict[str, float]]:
    """Write ``<name>.int8.onnx`` for each network; report max error and p50 latency of both."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    report: dict[str, dict[str, float]] = {}
    for name in NETWORKS:
        source, target = directory / f"{name}.onnx", directory / f"{name}.int8.onnx"
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # the quantiser logs advice on the root logger
        try:
            quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
        finally:
            root.setLevel(level)
        # A realistic request: 500 candidates, or 64 users with full sequences.
        inputs = example_inputs(name, networks.config, size=500 if name != "user_tower" else 64,
                                length=networks.config.max_sequence, seed=2)
        feeds = {key: value.numpy() for key, value in zip(INPUT_NAMES[name], inputs)}
        float_model, int8_model = session(source), session(target)
        reference = float_model.run(None, feeds)[0]
        difference = np.abs(reference - int8_model.run(None, feeds)[0])
        report[name] = {
            "max_abs_output": float(np.abs(reference).max()),
            "max_abs_diff": float(difference.max()),
            "mean_abs_diff": float(difference.mean()),
            "p50_seconds_fp32": _median_latency_seconds(float_model, feeds),
            "p50_seconds_int8": _median_latency_seconds(int8_model, feeds),
        }
    return report


def format_int8_report(report: dict[str, dict[str, float]]) -> str:
    lines = [f"{'network':<12} {'max|diff|':>10} {'mean|diff|':>11} {'fp32 p50 ms':>12} {'int8 p50 ms':>12}"]
    for name, row in report.items():
        lines.append(
            f"{name:<12} {row['max_abs_diff']:>10.2e} {row['mean_abs_diff']:>11.2e} "
            f"{1e3 * row['p50_seconds_fp32']:>12.2f} {1e3 * row['p50_seconds_int8']:>12.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.export.fused", description=__doc__)
    parser.add_argument("artefact", type=Path, help="artefact directory with config.json and weights.pt")
    parser.add_argument("--int8", action="store_true", help="also write int8 dynamically quantised copies")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE)
    parser.add_argument("--exporter", choices=EXPORTERS, default="torchscript")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    networks = Networks.load(args.artefact)
    errors = export_all(networks, args.artefact, args.tolerance, args.exporter)
    print(json.dumps({"parity_max_abs_diff": errors}))
    if args.int8:
        print(format_int8_report(quantize_int8(networks, args.artefact)))
    if (args.artefact / MANIFEST).is_file():
        manifest = read_manifest(args.artefact, verify=False)
        write_manifest(args.artefact, {key: value for key, value in manifest.items() if key != "files"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
