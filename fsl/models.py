"""Backbones of the protocol: conv4 (Finn et al. 2017) and resnet12 (Oreshkin et al. 2018 / Lee et al. 2019).

Both return a `FewShotClassifier` with `features` (image -> feature map) and a linear `classifier` head for `ways`
classes. Every layer runs T tasks at once (the meta-batch, or several test episodes): images are (T, N, C, H, W),
each weight is shared by the tasks or carries a leading task dimension (the per-task fast weights of MAML's inner
loop), convolutions are grouped by task and BatchNorm normalises each task with its own statistics. T = 1 is the
plain network, layer for layer. BatchNorm keeps no running statistics (`track_running_stats=False`): it always
normalises with the statistics of the batch it is given, in training, validation and test alike, as MMFewShot's MAML
does. This makes evaluation transductive over the query batch, like the original MAML.

Every forward takes the inner step `step` as an argument (default 0). It matters only to MAML++'s per-step BatchNorm
weights (`build_model(per_step_bn=S)`), which use their row `step`; the inner loop (fsl.maml) passes it.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fsl import config
from fsl.config import ModelConfig


class TaskConv2d(nn.Conv2d):
    """nn.Conv2d for T tasks at once, their channels stacked: input (N, T*C_in, H, W) -> (N, T*C_out, H', W').

    The weight is (T, C_out, C_in, k, k), one per task (fast weights during adaptation): one grouped convolution
    runs all tasks; or (C_out, C_in, k, k), shared by the T tasks (T is read off the input; e.g. ANIL's body): the
    input is then the N*T images (N, T, C_in, H, W) of one plain convolution, a view, without copying the weight T
    times. With T = 1 and a 4-d weight this is exactly nn.Conv2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tasks = x.shape[1] // self.in_channels
        if self.weight.dim() == 4:
            n, height, width = x.shape[0], x.shape[2], x.shape[3]
            out = F.conv2d(x.reshape(n * tasks, self.in_channels, height, width), self.weight, self.bias,
                           self.stride, self.padding)                         # (N*T, C_out, H', W')
            return out.view(n, tasks * self.out_channels, *out.shape[2:])
        return F.conv2d(x, self.weight.flatten(0, 1), None if self.bias is None else self.bias.flatten(),
                        self.stride, self.padding, groups=tasks)


class TaskBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over task-stacked channels (N, T*C, H, W), always with the statistics of the batch it is given
    (no running statistics), so each task is normalised by its own statistics. weight/bias: (C,) shared or (T, C)
    per task; `scale=False`: no weight, an offset only (TensorFlow's batch_norm default, cbfinn's network), run with
    a constant all-ones scale (torch's batch_norm double backward fails without a weight once the bias is
    differentiated too: "Expected a proper Tensor but got None ... 'other'"). After
    `per_step(S)` (MAML++'s per-step BatchNorm weights and biases) they are (S, C) or (T, S, C) and the forward's
    `step` picks the row."""

    def __init__(self, channels: int, scale: bool = True, eps: float = 1e-5):
        super().__init__(channels, eps=eps, track_running_stats=False)
        if not scale:
            self.weight = None
        self.steps = 0  # per-step weights: how many rows (0: one weight, no rows)
        self.unit: torch.Tensor | None = None  # the constant scale of `scale=False`, made at first use

    def per_step(self, steps: int) -> None:
        """One weight (if any) and bias per inner step: (steps, C), initialised to 1 and 0."""
        self.steps = steps
        if self.weight is not None:
            self.weight = nn.Parameter(torch.ones(steps, self.num_features))
        self.bias = nn.Parameter(torch.zeros(steps, self.num_features))

    def forward(self, x: torch.Tensor, step: int = 0) -> torch.Tensor:
        tasks = x.shape[1] // self.num_features
        weight, bias = self.weight, self.bias
        if self.steps:
            weight, bias = None if weight is None else weight[..., step, :], bias[..., step, :]
        if bias.dim() == 1 and tasks > 1:
            weight, bias = None if weight is None else weight.repeat(tasks), bias.repeat(tasks)
        return F.batch_norm(x, None, None, self.unit_scale(x, bias) if weight is None else weight.flatten(), bias.flatten(),
                            True, 0.0, self.eps)

    def unit_scale(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Ones (x's channels,) in the bias's dtype, kept between calls: the scale of a BatchNorm without one. The
        bias's dtype, not x's: under bf16 autocast x is bfloat16 while the parameters stay float32, and batch_norm
        takes a weight and a bias of one dtype."""
        if self.unit is None or self.unit.shape[0] != x.shape[1] or self.unit.dtype != bias.dtype \
                or self.unit.device != bias.device:
            self.unit = torch.ones(x.shape[1], dtype=bias.dtype, device=bias.device)
        return self.unit


class TaskLinear(nn.Linear):
    """nn.Linear for T tasks: input (T, N, in) -> (T, N, out); weight (out, in) shared or (T, out, in) per task."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dim() == 2:
            return F.linear(x, self.weight, self.bias)
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))  # (T, N, out)


class StepSequential(nn.Sequential):
    """nn.Sequential whose forward passes the inner step to the layers that use it (BatchNorm, residual blocks)."""

    def forward(self, x: torch.Tensor, step: int = 0) -> torch.Tensor:
        for layer in self:
            x = layer(x, step=step) if isinstance(layer, STEPPED) else layer(x)
        return x


def batch_norm(channels: int) -> TaskBatchNorm2d:
    """BatchNorm that always uses batch statistics (no running mean/var buffers), the protocol's."""
    return TaskBatchNorm2d(channels)


class SpatialMean(nn.Module):
    """(N, C, H, W) -> (N, C, 1, 1): the mean over height and width (cbfinn's Omniglot head input)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3), keepdim=True)


class FewShotClassifier(nn.Module):
    """features: (N, T*C, H, W) -> (N, T*C', h, w); classifier: (T, N, feature_dim) -> (T, N, ways) logits.

    forward takes the images of T tasks, (T, N, C, H, W), and returns their logits (T, N, ways); each task sees only
    its own images and weights (grouped convolutions, per-task BatchNorm statistics). A single task's (N, C, H, W)
    gives (N, ways)."""

    def __init__(self, features: nn.Module, feature_dim: int, ways: int):
        super().__init__()
        self.features = features
        self.feature_dim = feature_dim
        self.classifier = TaskLinear(feature_dim, ways)  # PyTorch default init, as in the protocol

    def embed(self, x: torch.Tensor, step: int = 0) -> torch.Tensor:
        """Features of T tasks' images: (T, N, C, H, W) -> (T, N, feature_dim)."""
        tasks, n = x.shape[:2]
        stacked = x.transpose(0, 1).reshape(n, -1, *x.shape[3:])         # (N, T*C, H, W), task-major channels
        return self.features(stacked, step=step).reshape(n, tasks, -1).transpose(0, 1)  # (T, N, feature_dim)

    def forward(self, x: torch.Tensor, step: int = 0) -> torch.Tensor:
        if x.dim() == 4:
            return self.forward(x.unsqueeze(0), step=step).squeeze(0)
        return self.classifier(self.embed(x, step=step))                  # (T, N, ways)


def conv4_features(channels: int = 64, in_channels: int = 3, downsample: str = "maxpool", head_input: str = "flatten",
                   norm: Callable[[int], nn.Module] = batch_norm) -> StepSequential:
    """4 blocks of 3x3 convolutions (padding 1, bias) -> BN -> ReLU, each halving the image, then the head's input.

    downsample maxpool (the protocol's): stride 1, then MaxPool 2; 84x84 -> 64x5x5 (flattened: 1600).
    downsample stride (Finn et al.'s Omniglot network): stride 2, no pooling; 28x28 -> 14 -> 7 -> 4 -> 64x2x2.
    head_input flatten: the last map flattened; mean: its spatial mean (64, whatever the image size)."""
    layers: list[nn.Module] = []
    stride = 2 if downsample == "stride" else 1
    for _ in range(4):
        layers += [TaskConv2d(in_channels, channels, 3, stride=stride, padding=1, bias=True), norm(channels),
                   nn.ReLU()]
        layers += [nn.MaxPool2d(2)] if downsample == "maxpool" else []
        in_channels = channels
    layers += [SpatialMean()] if head_input == "mean" else []
    return StepSequential(*layers)


class ResidualBlock(nn.Module):
    """3 x (Conv3x3 no bias -> BN), LeakyReLU(0.1) after the first two and after the residual sum,
    shortcut Conv1x1 + BN, then MaxPool2. (B, in, H, W) -> (B, out, H//2, W//2)."""

    def __init__(self, in_channels: int, out_channels: int, norm: Callable[[int], nn.Module] = batch_norm):
        super().__init__()
        self.conv1 = TaskConv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = norm(out_channels)
        self.conv2 = TaskConv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = norm(out_channels)
        self.conv3 = TaskConv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn3 = norm(out_channels)
        self.shortcut = StepSequential(TaskConv2d(in_channels, out_channels, 1, bias=False), norm(out_channels))
        self.act = nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor, step: int = 0) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x), step=step))
        out = self.act(self.bn2(self.conv2(out), step=step))
        out = self.bn3(self.conv3(out), step=step)
        return self.pool(self.act(out + self.shortcut(x, step=step)))


STEPPED = (TaskBatchNorm2d, ResidualBlock, StepSequential)  # the layers whose forward takes the inner step


def resnet12_features(channels: tuple[int, ...] = (64, 160, 320, 640), in_channels: int = 3,
                      norm: Callable[[int], nn.Module] = batch_norm) -> StepSequential:
    """4 residual blocks (64-160-320-640) then global average pooling; 84x84 -> 640x5x5 -> 640."""
    blocks: list[nn.Module] = []
    for out_channels in channels:
        blocks.append(ResidualBlock(in_channels, out_channels, norm))
        in_channels = out_channels
    return StepSequential(*blocks, nn.AdaptiveAvgPool2d(1))


def build_conv4(in_channels: int, norm: Callable[[int], nn.Module], options: ModelConfig) -> StepSequential:
    return conv4_features(in_channels=in_channels, downsample=options.downsample, head_input=options.head_input,
                          norm=norm)


def build_resnet12(in_channels: int, norm: Callable[[int], nn.Module], options: ModelConfig) -> StepSequential:
    return resnet12_features(in_channels=in_channels, norm=norm)


# model.arch -> build(in_channels, norm, options): the feature extractor, (N, T*in_channels, H, W) -> (N, T*C', h, w)
# for T tasks at once (Task* layers and `norm`, BatchNorm with per-task statistics; options: the model.* settings)
BACKBONES: dict[str, Callable[[int, Callable[[int], nn.Module], ModelConfig], nn.Module]] = {
    "conv4": build_conv4, "resnet12": build_resnet12}


def register_backbone(name: str, build: Callable[[int, Callable[[int], nn.Module], ModelConfig], nn.Module]) -> None:
    """Make `model.arch=name` build its features with `build(in_channels, norm, options)` (see BACKBONES). Call it
    before the config is loaded, e.g. in the script that runs fsl's command line (docs/examples/conv6_backbone.py)."""
    if name in BACKBONES and BACKBONES[name] is not build:
        raise ValueError(f"backbone {name!r} is already registered; pick another name")
    BACKBONES[name] = build
    if name not in config.ARCHS:
        config.ARCHS.append(name)


def init_weights(model: nn.Module, init: str = "kaiming") -> None:
    """kaiming (the protocol's): convs kaiming-normal (fan_out) with zero bias, BN weight 1 / bias 0, the linear head
    PyTorch's default. xavier (cbfinn's maml.py): convs glorot-uniform (tf xavier_initializer_conv2d) with zero bias,
    BN offset 0, head weights N(0, 1) (tf.random_normal) and zero head bias."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            if init == "xavier":
                nn.init.xavier_uniform_(module.weight)
            else:
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            if module.weight is not None:
                nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    if init == "xavier" and isinstance(model, FewShotClassifier):
        nn.init.normal_(model.classifier.weight, 0.0, 1.0)
        nn.init.zeros_(model.classifier.bias)


def build_model(arch: str, ways: int, image_size: int = 84, zero_head: bool = False, per_step_bn: int = 0,
                options: ModelConfig | None = None, in_channels: int = 3) -> FewShotClassifier:
    """Backbone `arch` with a `ways`-way linear head sized for `image_size` x `image_size` inputs of `in_channels`
    channels. `options`: the model.* settings (fsl.config.ModelConfig; None: the protocol's). `zero_head`: the
    head's weight and bias start at zero (`maml.zero_head`; fsl.maml.meta_parameters then leaves them out of the
    meta-optimizer, so every adaptation starts from a zero head). `per_step_bn`: that many BatchNorm weights and
    biases per layer, one per inner step (MAML++ BNWB; 0 = one)."""
    if arch not in BACKBONES:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(BACKBONES)}")
    options = options or ModelConfig(arch=arch)
    norm = functools.partial(TaskBatchNorm2d, scale=options.bn_scale, eps=options.bn_eps)
    features = BACKBONES[arch](in_channels, norm, options)
    with torch.no_grad():  # head width follows from the image size (conv4: 1600 at 84x84, 64 at 28x28)
        feature_dim = features(torch.zeros(2, in_channels, image_size, image_size)).flatten(1).shape[1]
    model = FewShotClassifier(features, feature_dim, ways)
    if per_step_bn:
        for module in model.modules():
            if isinstance(module, TaskBatchNorm2d):
                module.per_step(per_step_bn)
    init_weights(model, options.init)
    if zero_head:
        nn.init.zeros_(model.classifier.weight)
        nn.init.zeros_(model.classifier.bias)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
