"""Model zoo for SAM experiments.

All models are plain :class:`torch.nn.Module` s built from standard layers, with
no in-place operations and no Python-side state, so they work with
:func:`torch.func.functional_call` (the only state is the BatchNorm running
statistics, which are ordinary buffers).

Models (see :data:`MODELS`):

* ``digits_cnn``: a small CNN for the 8x8 single-channel scikit-learn digits.
* ``mnist1d_mlp``, ``mnist1d_cnn``: the MLP (40-100-100-10) and the strided 1-D CNN (about 5k
  parameters) of Greydanus & Kobak, "Scaling Down Deep Learning with MNIST-1D", ICML 2024, for
  signals of length 40; PyTorch's default initialisation, as there, and no BatchNorm.
* ``resnet20``, ``resnet32``, ``resnet56``: the CIFAR ResNets of He et al.,
  "Deep Residual Learning for Image Recognition", CVPR 2016, Sec. 4.2, with the
  parameter-free option-A shortcut.  ``skip=False`` gives the "noshort" variants
  of Li et al., "Visualizing the Loss Landscape of Neural Nets", NeurIPS 2018.
* ``wrn16_8``, ``wrn28_10``, ``wrn40_10``: the pre-activation Wide ResNets of
  Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016 (dropout 0).
  ``batchnorm=False`` gives the no-BN WRN-40-10 used for the Hessian spectra of
  Foret et al., "Sharpness-Aware Minimization for Efficiently Improving
  Generalization", ICLR 2021.

* ``timm:NAME``: any model of the timm library (the optional ``[timm]`` extra), randomly initialised;
  :mod:`sam.finetune` loads timm's pretrained weights into it from the local cache.

Every model names its classification head (:func:`head_names`: a ``HEAD`` class attribute, or timm's
``get_classifier()``), which finetuning on other classes starts afresh; :func:`resize_inputs` makes a
model upsample small images to the size it was pretrained at.

Initialisation: convolutions are Kaiming-normal (fan_out, ReLU gain) with zero
bias, BatchNorm has weight 1 and bias 0, and linear layers keep PyTorch's
default initialisation.  Without BatchNorm, residual networks additionally
scale the last convolution of every residual branch by ``1 / sqrt(L)``, where
``L`` is the number of residual blocks (see :func:`_scale_residual_branches`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MODELS",
    "DigitsCNN",
    "MNIST1DMLP",
    "MNIST1DCNN",
    "CifarResNet",
    "WideResNet",
    "TIMM_PREFIX",
    "available_models",
    "build_model",
    "is_timm",
    "timm_model",
    "import_timm",
    "head_names",
    "head_keys",
    "resize_inputs",
    "digits_cnn",
    "mnist1d_mlp",
    "mnist1d_cnn",
    "resnet20",
    "resnet32",
    "resnet56",
    "wrn16_8",
    "wrn28_10",
    "wrn40_10",
]


# --------------------------------------------------------------------------- #
# Shared helpers
# --------------------------------------------------------------------------- #
def _conv3x3(in_channels: int, out_channels: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)


def _norm(channels: int, batchnorm: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if batchnorm else nn.Identity()


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) convs with zero bias; BatchNorm weight 1, bias 0.

    He et al., "Delving Deep into Rectifiers", ICCV 2015.  Linear layers keep
    PyTorch's default initialisation.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


@torch.no_grad()
def _scale_residual_branches(blocks: list[nn.Module]) -> None:
    """Scale the last conv of each residual branch by ``1 / sqrt(len(blocks))``.

    Used only without BatchNorm.  With Kaiming init each residual branch roughly
    preserves the second moment of its input, so without normalisation it doubles
    at every block and explodes as ``2**L`` (SkipInit: De & Smith, "Batch
    Normalization Biases Residual Blocks Towards the Identity Function in Deep
    Networks", NeurIPS 2020).  Scaling the branch by ``L**-0.5`` bounds the growth
    by ``(1 + 1/L)**L <= e``, the same variance argument as Fixup (Zhang, Dauphin &
    Ma, "Fixup Initialization", ICLR 2019).  Unlike Fixup we do not zero-init the
    branch: a zero conv blocks the gradient to the conv before it, which leaves
    the Hessian at initialisation degenerate and would kill a network without
    shortcuts.  Each block must expose its last branch conv as ``conv2``.
    """
    scale = 1.0 / math.sqrt(len(blocks))
    for block in blocks:
        block.conv2.weight.mul_(scale)


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool (True or False), got {value!r}")


# --------------------------------------------------------------------------- #
# Digits CNN
# --------------------------------------------------------------------------- #
class DigitsCNN(nn.Module):
    """Small CNN for the 8x8 scikit-learn digits (~57k parameters).

    ``conv3x3(in, 32)-BN-ReLU, conv3x3(32, 64)-BN-ReLU, maxpool2 (8x8 -> 4x4),
    conv3x3(64, 64)-BN-ReLU, global average pool, Linear(64, num_classes)``.
    The receptive field of the last conv (10x10) covers the whole image, so
    global pooling loses nothing essential.

    Args:
        num_classes: Number of output logits.
        in_channels: Number of input channels (1 for the digits).
        batchnorm: If False, BatchNorm is replaced by ``nn.Identity`` and the
            convolutions get biases.
    """

    HEAD = "fc"  # the classification head (see head_names)

    def __init__(self, num_classes: int = 10, in_channels: int = 1, batchnorm: bool = True) -> None:
        super().__init__()
        bias = not batchnorm
        self.conv1 = _conv3x3(in_channels, 32, bias=bias)
        self.bn1 = _norm(32, batchnorm)
        self.conv2 = _conv3x3(32, 64, bias=bias)
        self.bn2 = _norm(64, batchnorm)
        self.conv3 = _conv3x3(64, 64, bias=bias)
        self.bn3 = _norm(64, batchnorm)
        self.fc = nn.Linear(64, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.max_pool2d(x, 2)
        x = F.relu(self.bn3(self.conv3(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


# --------------------------------------------------------------------------- #
# MNIST-1D models (Greydanus & Kobak 2024)
# --------------------------------------------------------------------------- #
MNIST1D_LENGTH = 40  # the generator's default final_seq_length


class MNIST1DMLP(nn.Module):
    """``Linear(C L, 100)-ReLU-Linear(100, 100)-ReLU-Linear(100, num_classes)`` on flattened signals.

    The MLP of the MNIST-1D paper (about 15k parameters for ``L = 40``). Input ``N x C x L``.
    """

    HEAD = "fc3"

    def __init__(self, num_classes: int = 10, in_channels: int = 1, length: int = MNIST1D_LENGTH,
                 hidden: int = 100) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_channels * length, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc3(F.relu(self.fc2(x)))


class MNIST1DCNN(nn.Module):
    """Three strided 1-D convolutions and a linear layer (about 5k parameters for ``L = 40``).

    ``Conv1d(C, 25, 5, stride 2, pad 1)-ReLU, Conv1d(25, 25, 3, stride 2, pad 1)-ReLU`` twice, then
    ``Linear(25 L', num_classes)`` with ``L' = 5`` for ``L = 40``: the CNN of the MNIST-1D paper.
    """

    HEAD = "fc"

    def __init__(self, num_classes: int = 10, in_channels: int = 1, length: int = MNIST1D_LENGTH,
                 channels: int = 25) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(in_channels, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        out = length
        for kernel in (5, 3, 3):
            out = (out + 2 - kernel) // 2 + 1
        self.fc = nn.Linear(channels * out, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.fc(torch.flatten(x, 1))


# --------------------------------------------------------------------------- #
# CIFAR ResNets (He et al. 2016, Sec. 4.2)
# --------------------------------------------------------------------------- #
class _PadShortcut(nn.Module):
    """Option-A shortcut: stride subsampling plus zero channel padding (no parameters)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.extra_channels = out_channels - in_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


class _BasicBlock(nn.Module):
    """Post-activation basic block: ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``.

    ``shortcut`` is ``nn.Identity``, a :class:`_PadShortcut`, or ``None`` when
    ``skip=False`` (then the block is ``relu(branch(x))``).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, batchnorm: bool, skip: bool) -> None:
        super().__init__()
        bias = not batchnorm
        self.conv1 = _conv3x3(in_channels, out_channels, stride, bias=bias)
        self.bn1 = _norm(out_channels, batchnorm)
        self.conv2 = _conv3x3(out_channels, out_channels, 1, bias=bias)
        self.bn2 = _norm(out_channels, batchnorm)
        self.shortcut: nn.Module | None
        if not skip:
            self.shortcut = None
        elif stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = _PadShortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return F.relu(out)


class CifarResNet(nn.Module):
    """CIFAR ResNet of depth ``6n + 2`` (He et al., CVPR 2016, Sec. 4.2).

    A 3x3 stem conv with 16 channels, three stages of ``n`` basic blocks with
    widths 16/32/64 (stride 2 at the start of stages 2 and 3), global average
    pooling and a linear classifier.  Shortcuts are option A (identity, or
    stride-2 subsampling plus zero-padded channels), so ResNet-20 has exactly
    272,474 parameters with 10 classes.

    Args:
        depth: Total depth, ``6n + 2`` (20, 32, 44, 56, 110, ...).
        num_classes: Number of output logits.
        in_channels: Number of input channels.
        batchnorm: If False, BatchNorm is replaced by ``nn.Identity``, the convs
            get biases and the residual branches are down-scaled at init (see
            :func:`_scale_residual_branches`).
        skip: If False, the shortcuts are removed entirely ("ResNet-56-noshort",
            Li et al., NeurIPS 2018).

    Raises:
        ValueError: If ``depth`` is not of the form ``6n + 2`` with ``n >= 1``.
    """

    HEAD = "fc"

    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        in_channels: int = 3,
        batchnorm: bool = True,
        skip: bool = True,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CifarResNet depth must be 6n + 2 with n >= 1 (20, 32, 56, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = _conv3x3(in_channels, 16, bias=not batchnorm)
        self.bn1 = _norm(16, batchnorm)
        stages = []
        width_in = 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(_BasicBlock(width_in, width, stride if i == 0 else 1, batchnorm, skip))
                width_in = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, num_classes)
        _init_weights(self)
        if skip and not batchnorm:
            _scale_residual_branches([b for stage in stages for b in stage])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


# --------------------------------------------------------------------------- #
# Wide ResNets (Zagoruyko & Komodakis 2016)
# --------------------------------------------------------------------------- #
class _PreActBlock(nn.Module):
    """Pre-activation basic block (He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016).

    ``branch = conv2(relu(bn2(conv1(relu(bn1(x))))))``.  When the shape changes,
    the shortcut is a 1x1 conv applied to ``relu(bn1(x))`` (as in the reference
    WRN code); otherwise it is the identity on ``x``.  ``skip=False`` drops the
    shortcut (``shortcut is None``).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, batchnorm: bool, skip: bool) -> None:
        super().__init__()
        bias = not batchnorm
        self.bn1 = _norm(in_channels, batchnorm)
        self.conv1 = _conv3x3(in_channels, out_channels, stride, bias=bias)
        self.bn2 = _norm(out_channels, batchnorm)
        self.conv2 = _conv3x3(out_channels, out_channels, 1, bias=bias)
        self.equal_in_out = stride == 1 and in_channels == out_channels
        self.shortcut: nn.Module | None
        if not skip:
            self.shortcut = None
        elif self.equal_in_out:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        if self.shortcut is None:
            return out
        return out + self.shortcut(x if self.equal_in_out else act)


class WideResNet(nn.Module):
    """WRN-d-k (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016), dropout 0.

    A 3x3 stem conv with 16 channels, three stages of ``(d - 4) / 6``
    pre-activation basic blocks with widths 16k/32k/64k (stride 2 at the start
    of stages 2 and 3), a final BN-ReLU, global average pooling and a linear
    classifier.  1x1 conv shortcuts where the shape changes.

    Args:
        depth: Total depth ``d``, ``6n + 4`` (16, 28, 40, ...).
        widen_factor: Width multiplier ``k``.
        num_classes: Number of output logits.
        in_channels: Number of input channels.
        batchnorm: If False, BatchNorm is replaced by ``nn.Identity``, the convs
            get biases and the residual branches are down-scaled at init (see
            :func:`_scale_residual_branches`).  This is the no-BN WRN of the SAM
            paper's Hessian experiment (Foret et al., ICLR 2021).
        skip: If False, all shortcuts (including the 1x1 convs) are removed,
            as in the "noshort" Wide ResNets of Li et al., NeurIPS 2018.

    Raises:
        ValueError: If ``depth`` is not ``6n + 4`` with ``n >= 1`` or
            ``widen_factor`` is not a positive int.
    """

    HEAD = "fc"

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int = 10,
        in_channels: int = 3,
        batchnorm: bool = True,
        skip: bool = True,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1 (16, 28, 40, ...), got {depth}")
        _check_positive_int("widen_factor", widen_factor)
        n = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = _conv3x3(in_channels, 16, bias=not batchnorm)
        stages = []
        width_in = 16
        for width, stride in zip(widths, (1, 2, 2)):
            blocks = []
            for i in range(n):
                blocks.append(_PreActBlock(width_in, width, stride if i == 0 else 1, batchnorm, skip))
                width_in = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = _norm(widths[-1], batchnorm)
        self.fc = nn.Linear(widths[-1], num_classes)
        _init_weights(self)
        if skip and not batchnorm:
            _scale_residual_branches([b for stage in stages for b in stage])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.relu(self.bn(x))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


# --------------------------------------------------------------------------- #
# Factories and registry
# --------------------------------------------------------------------------- #
def digits_cnn(*, num_classes: int = 10, in_channels: int = 1, batchnorm: bool = True, skip: bool = True) -> DigitsCNN:
    """Small CNN for 8x8 digits; see :class:`DigitsCNN`.

    Raises:
        ValueError: If ``skip=False``: the model has no skip connections to remove.
    """
    if not skip:
        raise ValueError("skip=False is not supported by 'digits_cnn' (it has no skip connections); use skip=True")
    return DigitsCNN(num_classes=num_classes, in_channels=in_channels, batchnorm=batchnorm)


def _no_skip_switch(name: str, skip: bool) -> None:
    if not skip:
        raise ValueError(f"skip=False is not supported by {name!r} (it has no skip connections); use skip=True")


def mnist1d_mlp(*, num_classes: int = 10, in_channels: int = 1, batchnorm: bool = True,
                skip: bool = True) -> MNIST1DMLP:
    """The MNIST-1D MLP; see :class:`MNIST1DMLP`. It has no BatchNorm, so ``batchnorm`` changes nothing.

    Raises:
        ValueError: If ``skip=False``: the model has no skip connections to remove.
    """
    _no_skip_switch("mnist1d_mlp", skip)
    return MNIST1DMLP(num_classes=num_classes, in_channels=in_channels)


def mnist1d_cnn(*, num_classes: int = 10, in_channels: int = 1, batchnorm: bool = True,
                skip: bool = True) -> MNIST1DCNN:
    """The MNIST-1D CNN; see :class:`MNIST1DCNN`. It has no BatchNorm, so ``batchnorm`` changes nothing.

    Raises:
        ValueError: If ``skip=False``: the model has no skip connections to remove.
    """
    _no_skip_switch("mnist1d_cnn", skip)
    return MNIST1DCNN(num_classes=num_classes, in_channels=in_channels)


def resnet20(*, num_classes: int = 10, in_channels: int = 3, batchnorm: bool = True, skip: bool = True) -> CifarResNet:
    """ResNet-20 (n = 3), 272,474 parameters with 10 classes; see :class:`CifarResNet`."""
    return CifarResNet(20, num_classes, in_channels, batchnorm, skip)


def resnet32(*, num_classes: int = 10, in_channels: int = 3, batchnorm: bool = True, skip: bool = True) -> CifarResNet:
    """ResNet-32 (n = 5); see :class:`CifarResNet`."""
    return CifarResNet(32, num_classes, in_channels, batchnorm, skip)


def resnet56(*, num_classes: int = 10, in_channels: int = 3, batchnorm: bool = True, skip: bool = True) -> CifarResNet:
    """ResNet-56 (n = 9); ``skip=False`` is Li et al.'s ResNet-56-noshort; see :class:`CifarResNet`."""
    return CifarResNet(56, num_classes, in_channels, batchnorm, skip)


def wrn16_8(*, num_classes: int = 10, in_channels: int = 3, batchnorm: bool = True, skip: bool = True) -> WideResNet:
    """WRN-16-8; see :class:`WideResNet`."""
    return WideResNet(16, 8, num_classes, in_channels, batchnorm, skip)


def wrn28_10(*, num_classes: int = 10, in_channels: int = 3, batchnorm: bool = True, skip: bool = True) -> WideResNet:
    """WRN-28-10, 36,479,194 parameters with 10 classes; see :class:`WideResNet`."""
    return WideResNet(28, 10, num_classes, in_channels, batchnorm, skip)


def wrn40_10(*, num_classes: int = 10, in_channels: int = 3, batchnorm: bool = True, skip: bool = True) -> WideResNet:
    """WRN-40-10; ``batchnorm=False`` is the SAM paper's Hessian model; see :class:`WideResNet`."""
    return WideResNet(40, 10, num_classes, in_channels, batchnorm, skip)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "digits_cnn": digits_cnn,
    "mnist1d_mlp": mnist1d_mlp,
    "mnist1d_cnn": mnist1d_cnn,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "wrn16_8": wrn16_8,
    "wrn28_10": wrn28_10,
    "wrn40_10": wrn40_10,
}
"""Registry: model name -> factory taking keyword arguments
``num_classes``, ``in_channels``, ``batchnorm`` and ``skip``."""


TIMM_PREFIX = "timm:"
"""``build_model("timm:NAME")`` builds timm's model NAME (an architecture, optionally with a weights tag)."""


def available_models() -> list[str]:
    """Return the registered model names, sorted (``timm:NAME`` models come on top of them)."""
    return sorted(MODELS)


def is_timm(name: object) -> bool:
    """Whether ``name`` names a timm model (``timm:NAME``)."""
    return isinstance(name, str) and name.startswith(TIMM_PREFIX)


def build_model(
    name: str,
    *,
    num_classes: int = 10,
    in_channels: int | None = None,
    batchnorm: bool = True,
    skip: bool = True,
    image_size: int | None = None,
) -> nn.Module:
    """Build a registered model, or timm's model with ``timm:NAME``.

    Args:
        name: One of :func:`available_models`, or ``timm:NAME`` with NAME a timm architecture
            (``resnet18``), optionally with its weights tag (``tf_efficientnet_b0.aa_in1k``); timm's
            random initialisation, never its pretrained weights (see :mod:`sam.finetune`).
        num_classes: Number of output logits.
        in_channels: Number of input channels; ``None`` uses the model's
            default (1 for ``digits_cnn`` and the MNIST-1D models, 3 for the CIFAR and timm models).
        batchnorm: If False, build the variant without BatchNorm (registered models only).
        skip: If False, build the variant without shortcut connections
            (residual networks only).
        image_size: The input size a timm model is built for, passed to architectures that take
            ``img_size`` (vision transformers); convolutional networks, and every registered model,
            take any size.

    Returns:
        The freshly initialised model, in training mode.

    Raises:
        ValueError: If ``name`` is not registered (nor a timm model), an argument has the wrong
            type or value, or a flag is not supported by the model.
        ImportError: ``timm:NAME`` without timm installed.
    """
    _check_positive_int("num_classes", num_classes)
    _check_bool("batchnorm", batchnorm)
    _check_bool("skip", skip)
    if in_channels is not None:
        _check_positive_int("in_channels", in_channels)
    if is_timm(name):
        if not (batchnorm and skip):
            raise ValueError(f"{name!r} is timm's architecture as timm builds it: batchnorm=False and skip=False "
                             "apply to the registered models only")
        return timm_model(name.removeprefix(TIMM_PREFIX), num_classes=num_classes, in_channels=in_channels or 3,
                          image_size=image_size)
    if name not in MODELS:
        raise ValueError(f"unknown model name {name!r}; available models: {', '.join(available_models())}, "
                         f"or {TIMM_PREFIX}NAME for timm's model NAME")
    kwargs: dict[str, object] = {"num_classes": num_classes, "batchnorm": batchnorm, "skip": skip}
    if in_channels is not None:
        kwargs["in_channels"] = in_channels
    return MODELS[name](**kwargs)


# --------------------------------------------------------------------------- #
# timm models, classification heads, input resizing
# --------------------------------------------------------------------------- #
def import_timm() -> Any:
    """The ``timm`` module, or an ImportError that says how to install it."""
    try:
        import timm
    except ImportError:
        raise ImportError("timm models (timm:NAME) need timm: pip install sam-landscape[timm]") from None
    return timm


def timm_model(
    name: str,
    *,
    num_classes: int | None = None,
    in_channels: int = 3,
    image_size: int | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """timm's model ``name`` (``timm.create_model``), randomly initialised or loaded from ``weights``.

    Args:
        name: A timm architecture, optionally with a weights tag (``resnet18.a1_in1k``).
        num_classes: Logits of the head; ``None``: the number of classes of timm's pretrained weights
            for ``name`` (1000 for ImageNet).
        in_channels: Input channels; timm adapts pretrained first-layer filters to them.
        image_size: Passed as ``img_size`` to architectures that take it (vision transformers, whose
            position embeddings timm resamples); ignored by the others, which take any size.
        weights: A state_dict of ``name`` (timm's pretrained weights), loaded the way timm loads its
            pretrained weights (the stem adapted to ``in_channels``, a head of another size left out);
            ``None``: timm's random initialisation. Nothing is downloaded either way.

    Raises:
        ImportError: timm is not installed.
        ValueError: timm has no model ``name``.
    """
    timm = import_timm()
    architecture = name.split(".", 1)[0]
    if not timm.is_model(architecture):
        raise ValueError(f"timm has no model {architecture!r} (from {TIMM_PREFIX}{name}); list them with "
                         f"python -c \"import timm; print(timm.list_models('*{architecture[:5]}*'))\"")
    kwargs: dict[str, Any] = {"in_chans": in_channels}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if weights is not None:
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"state_dict": weights})
    if image_size is None:
        return timm.create_model(name, **kwargs)
    try:
        return timm.create_model(name, img_size=image_size, **kwargs)
    except TypeError as error:
        if "img_size" not in str(error):
            raise
        return timm.create_model(name, **kwargs)  # a convolutional network: it takes any size


def head_names(model: nn.Module) -> list[str]:
    """The module names of ``model``'s classification head, the last layer(s) that map features to logits.

    A model names its head with a ``HEAD`` class attribute (every registered model does: ``fc``, or
    ``fc3`` for the MNIST-1D MLP); a timm model tells it with ``get_classifier()`` (``fc``, ``classifier``,
    ``head``, ``head.fc``, ...; two modules for distilled transformers).

    Example:
        >>> head_names(build_model("mnist1d_mlp"))
        ['fc3']

    Raises:
        ValueError: ``model`` has neither.
    """
    name = getattr(type(model), "HEAD", None)
    if isinstance(name, str):
        return [name]
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        found = get_classifier()
        heads = found if isinstance(found, (tuple, list)) else (found,)
        names = [n for n, m in model.named_modules() if n and any(m is head for head in heads)]
        if names:
            return names
    raise ValueError(f"cannot tell which layer of {type(model).__name__} is its classification head: give the "
                     "class a HEAD attribute naming it (HEAD = 'fc'), or a get_classifier() method as timm models have")


def head_keys(model: nn.Module) -> list[str]:
    """The ``state_dict`` keys of ``model``'s classification head (:func:`head_names`)."""
    prefixes = tuple(name + "." for name in head_names(model))
    return [key for key in model.state_dict() if key.startswith(prefixes)]


def resize_inputs(model: nn.Module, size: int) -> nn.Module:
    """Make ``model`` resize its input images to ``size x size`` as its first operation; returns it.

    Bilinear interpolation (``F.interpolate``, ``align_corners=False``) in a forward pre-hook, so that
    the model takes the dataset's images as they are stored (CIFAR's 32 x 32) while its layers see the
    size they were pretrained at (224 x 224 for ImageNet models). The hook holds no state: the
    ``state_dict`` is the network's own, and analyses that rebuild the model from its run resize the
    same way.
    """
    _check_positive_int("image size", size)
    model.register_forward_pre_hook(functools.partial(_resize_first_input, size=size))
    return model


def _resize_first_input(module: nn.Module, args: tuple[Any, ...], *, size: int) -> tuple[Any, ...]:
    x = args[0]
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x, *args[1:])
