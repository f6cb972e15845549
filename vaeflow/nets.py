"""Encoder and decoder building blocks.

The models receive *factories*: callables ``(input_shape, out_features) -> nn.Module``, so that
YAML sets the architecture (``class_path`` + ``init_args``) while the model supplies the sizes
it derives from the data and the likelihood. Any ``nn.Module`` class with that signature works.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

from torch import Tensor, nn

from vaeflow.errors import ConfigError

#: builds a network from the shape of its input and the number of outputs it must produce.
NetFactory = Callable[[tuple[int, ...], int], nn.Module]


def activation_class(name: str) -> type[nn.Module]:
    """A ``torch.nn`` activation class by name ("Tanh", "ReLU", "SiLU", ...)."""
    cls = getattr(nn, name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(
            f"unknown activation {name!r}: use the name of a torch.nn module, e.g. Tanh, ReLU, "
            "SiLU, GELU, ELU, LeakyReLU"
        )
    return cls


class MLP(nn.Module):
    """Fully connected network; flattens each input example, outputs ``out_features`` numbers.

    Args:
        input_shape: shape of one input example (filled in by the model).
        out_features: outputs per example (filled in by the model).
        hidden: widths of the hidden layers.
        activation: a ``torch.nn`` activation name, applied after every hidden layer.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        out_features: int,
        hidden: Sequence[int] = (200, 200),
        activation: str = "Tanh",
    ) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        act = activation_class(activation)
        widths = [math.prod(self.input_shape), *hidden]
        layers: list[nn.Module] = []
        for width_in, width_out in itertools.pairwise(widths):
            layers += [nn.Linear(width_in, width_out), act()]
        layers.append(nn.Linear(widths[-1], out_features))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x.flatten(-len(self.input_shape)))
