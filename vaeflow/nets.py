"""Encoder and decoder building blocks.

The models receive *factories*: callables ``(input_shape, output_shape) -> nn.Module`` whose
module maps a batch ``(N, *input_shape)`` to ``(N, *output_shape)``, so that YAML sets the
architecture (``class_path`` + ``init_args``) while the model supplies the shapes it derives from
the data and the likelihood (a convolutional decoder needs the image shape, not a count). Any
``nn.Module`` class with that signature works; registered with ``@register_net("name")`` (or an
entry point in the ``vaeflow.nets`` group) it also works by name (``encoder: conv_encoder``) and
is tested automatically in both roles (``tests/test_vae_registry.py``). A net that cannot serve
a role (a convolutional encoder cannot map a latent code to an image) refuses it with a
:class:`~vaeflow.errors.ConfigError` from its constructor.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from vaeflow.errors import ConfigError
from vaeflow.registry import NETS, register_net
from vaeflow.utils import check_memory

#: builds a network from the shape of one input example and the shape of one output.
NetFactory = Callable[[tuple[int, ...], tuple[int, ...]], nn.Module]


def build_net(
    spec: NetFactory | str, input_shape: tuple[int, ...], output_shape: tuple[int, ...]
) -> nn.Module:
    """The network of a factory or registered name for one input and one output shape."""
    factory = NETS.get(spec) if isinstance(spec, str) else spec
    return factory(input_shape, output_shape)


def conditioned_shape(shape: tuple[int, ...], condition_dim: int) -> tuple[int, ...]:
    """The input shape of a net that also takes a condition: ``condition_dim`` more features of
    a vector, or channels of an image (see :func:`append_condition`)."""
    first, *rest = shape
    return (first + condition_dim, *rest)


def append_condition(x: Tensor, condition: Tensor, event_dims: int) -> Tensor:
    """``x`` ``(*batch, C, *rest)`` (``event_dims`` = 1 + len(rest)) with ``condition`` ``(*batch,
    K)`` appended along its first event axis: K more features of a vector, or K more channels
    of an image, constant over its pixels (as conditional GANs and CVAEs feed labels to
    convolutions). Every net then takes a condition without being rewritten: it is built for
    :func:`conditioned_shape` of its input."""
    rest = x.shape[x.dim() - event_dims + 1 :]
    condition = condition.reshape(*condition.shape, *(1,) * len(rest))
    condition = condition.expand(*x.shape[: x.dim() - event_dims], -1, *rest).to(x.dtype)
    return torch.cat([x, condition], dim=x.dim() - event_dims)


def activation_class(name: str) -> type[nn.Module]:
    """A ``torch.nn`` activation class by name ("Tanh", "ReLU", "SiLU", ...)."""
    cls = getattr(nn, name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(
            f"unknown activation {name!r}: use the name of a torch.nn module, e.g. Tanh, ReLU, "
            "SiLU, GELU, ELU, LeakyReLU"
        )
    return cls


@register_net("mlp")
class MLP(nn.Module):
    """Fully connected network; flattens each input example, outputs ``output_shape``.

    Args:
        input_shape: shape of one input example (filled in by the model).
        output_shape: shape of one output (filled in by the model).
        hidden: widths of the hidden layers.
        activation: a ``torch.nn`` activation name, applied after every hidden layer.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        output_shape: tuple[int, ...],
        hidden: Sequence[int] = (200, 200),
        activation: str = "Tanh",
    ) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.output_shape = tuple(output_shape)
        act = activation_class(activation)
        widths = [math.prod(self.input_shape), *hidden]
        check_widths("MLP", [*widths, math.prod(self.output_shape)])
        layers: list[nn.Module] = []
        for width_in, width_out in itertools.pairwise(widths):
            layers += [nn.Linear(width_in, width_out), act()]
        layers.append(nn.Linear(widths[-1], math.prod(self.output_shape)))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        outputs = self.layers(x.flatten(-len(self.input_shape)))
        # a flat output shape needs no view (each is an autograd node, in every step)
        return outputs if len(self.output_shape) == 1 else outputs.unflatten(-1, self.output_shape)


def check_widths(net: str, widths: Sequence[int]) -> None:
    """Refuse a layer width that is not positive, and layers too large for the memory (a
    ``latent_dim`` of 10**9 asks for terabytes of weights).

    Args:
        net: the network's class name, for the message.
        widths: the widths of its layers in order, input and output included.
    """
    if any(width < 1 for width in widths):
        raise ConfigError(
            f"{net}: every layer width (hidden sizes, channels, and the sizes of the input and "
            f"output) must be a positive integer; got {list(widths)}"
        )
    weights = sum(a * b for a, b in itertools.pairwise(widths))
    check_memory(
        weights * 4 * 4,  # float32 weights, their gradient and two Adam moments
        f"{net} with layers of widths {list(widths)}",
        "choose smaller sizes (latent_dim, hidden)",
    )


def image_shape(shape: tuple[int, ...], strides: int, role: str) -> tuple[int, int, int]:
    """``shape`` as (channels, height, width), each side divisible by ``2 ** strides``."""
    factor = 2**strides
    if len(shape) != 3 or shape[1] % factor or shape[2] % factor:
        raise ConfigError(
            f"a convolutional {role} needs images (channels, height, width) with sides divisible "
            f"by {factor} ({strides} stride-2 layers), e.g. (1, 28, 28) or (3, 32, 32); got "
            f"{tuple(shape)}. Keep the images unflattened (data option flatten: false)"
        )
    return shape[0], shape[1], shape[2]


@register_net("conv_encoder")
class ConvEncoder(nn.Module):
    """Convolutional encoder: stride-2 4x4 convolutions halve the image ``len(channels)`` times
    (28 -> 14 -> 7, 32 -> 16 -> 8), then a hidden linear layer and the output layer.

    Args:
        input_shape: (channels, height, width) of one image (filled in by the model).
        output_shape: shape of one output (filled in by the model).
        channels: output channels of each convolution.
        hidden: width of the linear layer after the convolutions.
        activation: a ``torch.nn`` activation name.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        output_shape: tuple[int, ...],
        channels: Sequence[int] = (32, 64),
        hidden: int = 256,
        activation: str = "ReLU",
    ) -> None:
        super().__init__()
        check_widths("ConvEncoder", [*channels, hidden])
        in_channels, height, width = image_shape(tuple(input_shape), len(channels), "encoder")
        self.input_shape = tuple(input_shape)
        self.output_shape = tuple(output_shape)
        act = activation_class(activation)
        layers: list[nn.Module] = []
        for c_in, c_out in itertools.pairwise([in_channels, *channels]):
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), act()]
        side = 2 ** len(channels)
        features = channels[-1] * (height // side) * (width // side)
        layers += [nn.Flatten(), nn.Linear(features, hidden), act()]
        layers.append(nn.Linear(hidden, math.prod(self.output_shape)))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        batch = x.shape[: x.dim() - len(self.input_shape)]
        images = x.reshape(-1, *self.input_shape)
        return self.layers(images).reshape(*batch, *self.output_shape)


@register_net("conv_decoder")
class ConvDecoder(nn.Module):
    """Convolutional decoder, the mirror of :class:`ConvEncoder`: a hidden linear layer, a
    linear map to ``channels[0]`` feature maps at 1 / 2^len(channels) of the image size, then
    stride-2 4x4 transposed convolutions up to the output's (channels, height, width).

    Args:
        input_shape: shape of one latent code (filled in by the model).
        output_shape: (channels, height, width) of one output (filled in by the model).
        channels: input channels of each transposed convolution.
        hidden: width of the first linear layer.
        activation: a ``torch.nn`` activation name.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        output_shape: tuple[int, ...],
        channels: Sequence[int] = (64, 32),
        hidden: int = 256,
        activation: str = "ReLU",
    ) -> None:
        super().__init__()
        check_widths("ConvDecoder", [*channels, hidden])
        out_channels, height, width = image_shape(tuple(output_shape), len(channels), "decoder")
        self.input_shape = tuple(input_shape)
        self.output_shape = tuple(output_shape)
        act = activation_class(activation)
        side = 2 ** len(channels)
        start = (channels[0], height // side, width // side)
        layers: list[nn.Module] = [
            nn.Linear(math.prod(self.input_shape), hidden),
            act(),
            nn.Linear(hidden, math.prod(start)),
            act(),
            nn.Unflatten(-1, start),
        ]
        widths = [*channels, out_channels]
        for i, (c_in, c_out) in enumerate(itertools.pairwise(widths)):
            layers.append(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1))
            if i < len(channels) - 1:
                layers.append(act())
        self.layers = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        batch = z.shape[: z.dim() - len(self.input_shape)]
        codes = z.reshape(-1, math.prod(self.input_shape))
        return self.layers(codes).reshape(*batch, *self.output_shape)
