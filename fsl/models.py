"""Backbones of the protocol: conv4 (Finn et al. 2017) and resnet12 (Oreshkin et al. 2018 / Lee et al. 2019).

Both return a `FewShotClassifier` with `features` (image -> flat feature vector) and a linear `classifier` head
for `ways` classes. BatchNorm keeps no running statistics (`track_running_stats=False`): it always normalises with
the statistics of the batch it is given, in training, validation and test alike, as MMFewShot's MAML does. This makes
evaluation transductive over the query batch, like the original MAML.
"""
from __future__ import annotations

import torch
from torch import nn


def batch_norm(channels: int) -> nn.BatchNorm2d:
    """BatchNorm that always uses batch statistics (no running mean/var buffers)."""
    return nn.BatchNorm2d(channels, track_running_stats=False)


class FewShotClassifier(nn.Module):
    """features: (B, C, H, W) -> (B, feature_dim); classifier: (B, feature_dim) -> (B, ways) logits."""

    def __init__(self, features: nn.Module, feature_dim: int, ways: int):
        super().__init__()
        self.features = features
        self.feature_dim = feature_dim
        self.classifier = nn.Linear(feature_dim, ways)  # PyTorch default init, as in the protocol

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))  # (B, feature_dim) -> (B, ways)


def conv4_features(channels: int = 64) -> nn.Sequential:
    """4 x [Conv3x3(pad 1, bias) -> BN -> ReLU -> MaxPool2]; 84x84 -> 64x5x5 (flattened: 1600)."""
    layers: list[nn.Module] = []
    in_channels = 3
    for _ in range(4):
        layers += [nn.Conv2d(in_channels, channels, 3, padding=1, bias=True), batch_norm(channels), nn.ReLU(),
                   nn.MaxPool2d(2)]
        in_channels = channels
    return nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    """3 x (Conv3x3 no bias -> BN), LeakyReLU(0.1) after the first two and after the residual sum,
    shortcut Conv1x1 + BN, then MaxPool2. (B, in, H, W) -> (B, out, H//2, W//2)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = batch_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = batch_norm(out_channels)
        self.conv3 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn3 = batch_norm(out_channels)
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), batch_norm(out_channels))
        self.act = nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.pool(self.act(out + self.shortcut(x)))


def resnet12_features(channels: tuple[int, ...] = (64, 160, 320, 640)) -> nn.Sequential:
    """4 residual blocks (64-160-320-640) then global average pooling; 84x84 -> 640x5x5 -> 640."""
    blocks: list[nn.Module] = []
    in_channels = 3
    for out_channels in channels:
        blocks.append(ResidualBlock(in_channels, out_channels))
        in_channels = out_channels
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1))


BACKBONES = {"conv4": conv4_features, "resnet12": resnet12_features}


def init_weights(model: nn.Module) -> None:
    """Protocol initialisation: convs kaiming-normal (fan_out) with zero bias, BN weight 1 / bias 0.
    The linear head keeps PyTorch's default initialisation."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def build_model(arch: str, ways: int, image_size: int = 84, zero_head: bool = False) -> FewShotClassifier:
    """Backbone `arch` with a `ways`-way linear head sized for `image_size` x `image_size` RGB inputs.
    `zero_head`: the head's weight and bias start at zero (`maml.zero_head`; fsl.maml.meta_parameters then leaves
    them out of the meta-optimizer, so every adaptation starts from a zero head)."""
    if arch not in BACKBONES:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(BACKBONES)}")
    features = BACKBONES[arch]()
    with torch.no_grad():  # head width follows from the image size (conv4: 1600 at 84x84, 64 at 28x28)
        feature_dim = features(torch.zeros(2, 3, image_size, image_size)).flatten(1).shape[1]
    model = FewShotClassifier(features, feature_dim, ways)
    init_weights(model)
    if zero_head:
        nn.init.zeros_(model.classifier.weight)
        nn.init.zeros_(model.classifier.bias)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
