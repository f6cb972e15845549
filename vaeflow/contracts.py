"""The parts a VAE is composed of, exercised on two examples as the model binds them, so that a
registered family or network (a plugin's, most often) that returns the wrong shape or type is
refused at once, naming the class, what it returned, what was expected and how to fix it,
instead of failing deep inside the first training step.

The check runs without gradients, in eval mode and under a random stream of its own: the
model's parameters, training mode and random stream are as they were.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from vaeflow.errors import ConfigError

#: How many examples a part is exercised on (two: a batch dimension that cannot be squeezed).
EXAMPLES = 2


def zeros(part: nn.Module, *shape: int) -> Tensor:
    """Inputs for ``part`` in the float type of its weights (a model may be in float64)."""
    tensors = [*part.parameters(), *part.buffers()]
    dtype = next((t.dtype for t in tensors if t.is_floating_point()), torch.get_default_dtype())
    return torch.zeros(*shape, dtype=dtype)


def class_name(part: Any) -> str:
    cls = type(part)
    registered = vars(cls).get("registered_name")  # not a registered parent's name
    return f"{cls.__module__}.{cls.__qualname__}" + (f" ({registered!r})" if registered else "")


def shape_of(value: Any) -> str:
    """What a part returned, for the message: a tensor's or distribution's shape, or its type."""
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, Distribution):
        return (
            f"a {type(value).__name__} of batch shape {tuple(value.batch_shape)} and event "
            f"shape {tuple(value.event_shape)}"
        )
    return f"a {type(value).__name__}"


@contextlib.contextmanager
def exercised(part: nn.Module, role: str, fix: str) -> Iterator[None]:
    """Run a check of ``part`` without side effects, turning any error inside into a message."""
    modes = {module: module.training for module in part.modules()}
    part.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            yield
    except ConfigError:
        raise
    except Exception as error:
        raise ConfigError(
            f"{role} {class_name(part)} failed on a batch of {EXAMPLES} examples: "
            f"{type(error).__name__}: {error}. {fix}"
        ) from error
    finally:
        for module, training in modes.items():
            module.train(training)


def expect(
    part: nn.Module,
    role: str,
    call: str,
    value: Any,
    expected: str,
    ok: Callable[[Any], bool],
    fix: str,
) -> None:
    """Refuse ``value``, which ``call`` of ``part`` returned, unless ``ok(value)``."""
    if not ok(value):
        raise ConfigError(
            f"{role} {class_name(part)}: {call} returned {shape_of(value)}; expected {expected}. "
            f"{fix}"
        )


def is_distribution(batch: tuple[int, ...], event: tuple[int, ...]) -> Callable[[Any], bool]:
    return lambda value: (
        isinstance(value, Distribution)
        and tuple(value.batch_shape) == batch
        and tuple(value.event_shape) == event
    )


def is_tensor(shape: tuple[int, ...]) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, Tensor) and tuple(value.shape) == shape


def per_example(numbers: int) -> Callable[[Any], bool]:
    return lambda value: (
        isinstance(value, Tensor)
        and value.dim() >= 1
        and len(value) == EXAMPLES
        and value[0].numel() == numbers
    )


def check_likelihood(likelihood: Any) -> None:
    """A bound likelihood: decoder outputs for 2 examples -> a distribution of batch shape (2,)
    and the example's event shape, and ``log_prob`` of shape (2,)."""
    role, event = "likelihood", tuple(likelihood.event_shape)
    fix = (
        "distribution(params) receives params of shape (*data_shape, num_params) and returns "
        "the element-wise distribution, of batch shape data_shape: e.g. "
        "Bernoulli(logits=params[..., 0]); log_prob(outputs, x) returns one number per example"
    )
    with exercised(likelihood, role, fix):
        outputs = zeros(likelihood, EXAMPLES, likelihood.num_outputs)
        distribution = likelihood(outputs)
        expected = f"batch shape ({EXAMPLES},) and event shape {event}"
        ok = is_distribution((EXAMPLES,), event)
        expect(likelihood, role, "forward(outputs)", distribution, expected, ok, fix)
        x = distribution.sample()
        log_prob = likelihood.log_prob(outputs, x)
        expected = f"a tensor of shape ({EXAMPLES},)"
        expect(
            likelihood,
            role,
            "log_prob(outputs, x)",
            log_prob,
            expected,
            is_tensor(x.shape[:1]),
            fix,
        )


def check_prior(prior: Any, latent_dim: int) -> None:
    """A bound prior: a distribution over z, event shape (latent_dim,), no batch shape."""
    role = "prior"
    fix = (
        f"forward() returns p(z) as one distribution of event shape ({latent_dim},), e.g. "
        "Independent(Normal(loc, scale), 1)"
    )
    with exercised(prior, role, fix):
        distribution = prior()
        expected = f"a distribution of batch shape () and event shape ({latent_dim},)"
        expect(
            prior,
            role,
            "forward()",
            distribution,
            expected,
            is_distribution((), (latent_dim,)),
            fix,
        )
        log_prob = distribution.log_prob(distribution.sample((EXAMPLES,)))
        expected = f"a tensor of shape ({EXAMPLES},)"
        expect(prior, role, "log_prob(z)", log_prob, expected, is_tensor((EXAMPLES,)), fix)


def check_posterior(posterior: Any, latent_dim: int) -> None:
    """A bound posterior family: encoder outputs for 2 examples -> q(z | x) of batch shape (2,)
    and event shape (latent_dim,), whose reparameterised samples have that shape."""
    role = "posterior"
    fix = (
        "forward(outputs) of shape (N, num_outputs) returns q(z | x) of batch shape (N,) and "
        f"event shape ({latent_dim},) with rsample()"
    )
    with exercised(posterior, role, fix):
        distribution = posterior(zeros(posterior, EXAMPLES, posterior.num_outputs))
        expected = f"batch shape ({EXAMPLES},) and event shape ({latent_dim},)"
        ok = is_distribution((EXAMPLES,), (latent_dim,))
        expect(posterior, role, "forward(outputs)", distribution, expected, ok, fix)
        z = distribution.rsample()
        expected = f"a tensor of shape ({EXAMPLES}, {latent_dim})"
        expect(posterior, role, "rsample()", z, expected, is_tensor((EXAMPLES, latent_dim)), fix)


def check_net(net: nn.Module, role: str, input_shape: tuple[int, ...], outputs: int) -> None:
    """A built encoder or decoder: 2 inputs of ``input_shape`` -> ``outputs`` numbers each."""
    fix = (
        f"the {role} takes a batch of shape (N, {', '.join(map(str, input_shape))}) and "
        f"returns (N, {outputs}) (or (N, ...) of {outputs} numbers per example); a net "
        "registered by name is built as cls(input_shape, output_shape, **init_args)"
    )
    with exercised(net, role, fix):
        value = net(zeros(net, EXAMPLES, *input_shape))
        expected = f"{outputs} numbers for each of the {EXAMPLES} examples"
        expect(net, role, "forward(x)", value, expected, per_example(outputs), fix)
