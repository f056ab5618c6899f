"""The model registry: an architecture name and its arguments rebuild the network exactly.

Every model takes a ``(batch, C, X, Y, Z)`` volume (``C``: the input channels, one image kind each; one
today) and returns ``(batch, n_outputs)`` logits or values. The first layer halves the resolution: on CPU a
full-resolution stem costs ~10x more for no measurable gain at 2 mm (monai's ResNets likewise get ``conv1_t_stride=2``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import UsageError


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a network (stored in ``model.json``)."""

    architecture: str
    n_outputs: int
    in_shape: tuple[int, int, int]
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: Input channels (one per image kind of the model package's ``input.channels``).
    in_channels: int = 1

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["in_shape"] = list(self.in_shape)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return cls(
            architecture=data["architecture"],
            n_outputs=int(data["n_outputs"]),
            in_shape=tuple(int(x) for x in data["in_shape"]),  # type: ignore[arg-type]
            kwargs=dict(data.get("kwargs", {})),
            in_channels=int(data.get("in_channels", 1)),
        )


def _conv_block(c_in: int, c_out: int, *, stride: int = 1, pool: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm3d(c_out),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool3d(2, ceil_mode=True))
    return nn.Sequential(*layers)


class Conv5FC3(nn.Module):
    """ClinicaDL's Conv5-FC3 shape (five conv blocks, three dense layers), with a stride-2 stem.

    >>> net = Conv5FC3(n_outputs=2, channels=(2, 2, 2, 2, 2), hidden=(8, 4))
    >>> net(torch.zeros(1, 1, 24, 24, 24)).shape
    torch.Size([1, 2])
    """

    def __init__(
        self,
        n_outputs: int,
        *,
        in_channels: int = 1,
        channels: tuple[int, ...] = (8, 16, 32, 64, 128),
        hidden: tuple[int, ...] = (128, 64),
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        blocks = [_conv_block(in_channels, channels[0], stride=2, pool=False)]
        blocks += [_conv_block(a, b) for a, b in itertools.pairwise(channels)]
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool3d(2)
        dims = [channels[-1] * 8, *hidden]
        dense: list[nn.Module] = [nn.Flatten(), nn.Dropout(dropout)]
        for a, b in itertools.pairwise(dims):
            dense += [nn.Linear(a, b), nn.ReLU(inplace=True), nn.Dropout(dropout / 2)]
        dense.append(nn.Linear(dims[-1], n_outputs))
        self.classifier = nn.Sequential(*dense)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


def _monai_densenet121(n_outputs: int, in_channels: int = 1, **kwargs: Any) -> nn.Module:
    from monai.networks.nets import DenseNet121

    net = DenseNet121(spatial_dims=3, in_channels=in_channels, out_channels=n_outputs, **kwargs)
    # monai's stem is a stride-2 7^3 convolution followed by a max-pool: already reduced 4x.
    return net


def _monai_resnet(depth: int) -> Callable[..., nn.Module]:
    def build(n_outputs: int, in_channels: int = 1, **kwargs: Any) -> nn.Module:
        from monai.networks.nets import resnet

        factory = {10: resnet.resnet10, 18: resnet.resnet18}[depth]
        options = {"conv1_t_stride": 2, "conv1_t_size": 7, **kwargs}
        return factory(spatial_dims=3, n_input_channels=in_channels, num_classes=n_outputs, **options)

    return build


def _monai_unet(large: bool) -> Callable[..., nn.Module]:
    def build(n_outputs: int, in_channels: int = 1, **kwargs: Any) -> nn.Module:
        from monai.networks.nets import UNet

        options: dict[str, Any] = (
            {"channels": (32, 64, 128, 256, 320), "strides": (2, 2, 2, 2), "num_res_units": 2}
            if large
            else {"channels": (16, 32, 64, 128), "strides": (2, 2, 2), "num_res_units": 1}
        )
        return UNet(spatial_dims=3, in_channels=in_channels, out_channels=n_outputs, norm="instance",
                    **(options | kwargs))  # fmt: skip

    return build


#: Segmentation architectures: ``(batch, 1, X, Y, Z)`` -> ``(batch, n_outputs, X, Y, Z)`` logits, any size
#: divisible by their total stride.
SEGMENTATION_ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "unet": _monai_unet(large=False),
    "unet-large": _monai_unet(large=True),
}

#: Architecture name -> builder(n_outputs, in_channels=..., **kwargs).
ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "conv5fc3": Conv5FC3,
    "densenet121": _monai_densenet121,
    "resnet10": _monai_resnet(10),
    "resnet18": _monai_resnet(18),
    **SEGMENTATION_ARCHITECTURES,
}


class Standardized(nn.Module):
    """A network fed ``(x - mean) / scale``, with the training set's voxel-wise mean image.

    Registered brains differ from one another by a small fraction of their common signal; taking
    the mean image away leaves what tells subjects apart (a linear model on the same voxels
    separates the sample diagnoses perfectly, the raw CNN barely moves off chance in 30 epochs).
    ``mean`` and ``scale`` are buffers: they travel in the weights file, so the package alone
    feeds the network correctly.
    """

    def __init__(self, net: nn.Module, in_shape: tuple[int, int, int], in_channels: int = 1) -> None:
        super().__init__()
        self.net = net
        self.mean: torch.Tensor
        self.scale: torch.Tensor
        self.register_buffer("mean", torch.zeros(1, in_channels, *in_shape))
        self.register_buffer("scale", torch.ones(1))

    def set_reference(self, mean: torch.Tensor, scale: float) -> None:
        self.mean.copy_(mean.reshape(self.mean.shape))
        self.scale.fill_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.scale)


class Segmenter(nn.Module):
    """A segmentation network (its inputs are already normalised per image; no mean image)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_model(config: ModelConfig) -> nn.Module:
    """The network of ``config``, freshly initialised (seed torch first for reproducible weights)."""
    if config.architecture not in ARCHITECTURES:
        raise UsageError(
            f"Unknown architecture {config.architecture!r}: choose one of {', '.join(sorted(ARCHITECTURES))}."
        )
    net = ARCHITECTURES[config.architecture](config.n_outputs, in_channels=config.in_channels, **config.kwargs)
    if config.architecture in SEGMENTATION_ARCHITECTURES:
        return Segmenter(net)
    return Standardized(net, config.in_shape, config.in_channels)
