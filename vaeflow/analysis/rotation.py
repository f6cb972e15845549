"""Rotations of factor loadings: gradient projection (Jennrich 2001, 2002) and promax.

A factor model x = A z + e, z ~ N(0, I), is unchanged when the factors are transformed: for an
invertible M x M matrix T with unit-length columns, the factors f = T^T z have correlations
Phi = T^T T and the pattern P = A T^(-T) gives P Phi P^T = A A^T, so the implied covariance,
and with it the likelihood, stays the same. A rotation picks the T that makes P simplest by a
criterion Q(P). Orthogonal rotations keep T orthogonal (Phi = I, P = A T); oblique ones only
keep the columns of T at unit length, so that Phi is a correlation matrix. T is reported as
GPArotation's ``Th``.

Gradient projection (Bernaards & Jennrich, 2005, GPForth / GPFoblq) descends Q over T: the
gradient of Q with respect to T is projected onto the tangent space of the constraint, a step
is taken with a backtracking line search (doubled at each iteration, halved at most ten times
until the Armijo condition holds, as GPArotation does), and the step is mapped back onto the
constraint (the polar factor for orthogonal T, column normalisation for oblique T). The
iteration stops when the projected gradient's Frobenius norm is below ``tol``.

Criteria are classes found by name in :data:`ROTATIONS` (plugins add theirs through the
``vaeflow.rotations`` entry-point group); each returns Q and its gradient dQ/dP.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from vaeflow.registry import Registry

#: Rotation methods by name: ``rotate(loadings, "oblimin", gamma=0.5)`` builds ``Oblimin(0.5)``.
ROTATIONS: Registry[RotationMethod] = Registry("rotation", "vaeflow.rotations")
register_rotation = ROTATIONS.register

#: Step halvings of the line search per iteration (GPArotation's ``for (i in 0:10)``).
LINE_SEARCH_HALVINGS = 11

Criterion = Callable[[Tensor], tuple[Tensor, Tensor]]


class Rotation(NamedTuple):
    """A rotated solution, its factors ordered and signed (see :func:`rotate`).

    Attributes:
        loadings: the pattern P (D x M): regression weights of the features on the factors.
        phi: the factor correlations Phi = T^T T (M x M); the identity for orthogonal methods.
        rotation: T (M x M), GPArotation's ``Th``: P = A T^(-T) for the unrotated loadings A,
            and the rotated factors are T^T z. Orthogonal T gives P = A T.
    """

    loadings: Tensor
    phi: Tensor
    rotation: Tensor


class RotationMethod(ABC):
    """How to find T from (Kaiser-normalised) unrotated loadings A (D x M)."""

    #: Whether T may be non-orthogonal (correlated factors).
    oblique: ClassVar[bool]

    @abstractmethod
    def transform(self, loadings: Tensor, tol: float, max_iter: int) -> Tensor:
        """T (M x M) for the loadings A, as :class:`Rotation` defines it."""


class _Geometry(ABC):
    """The constraint set of T, as gradient projection needs it."""

    @staticmethod
    @abstractmethod
    def loadings(a: Tensor, t: Tensor) -> Tensor:
        """The pattern P of T."""

    @staticmethod
    @abstractmethod
    def gradient(a: Tensor, t: Tensor, pattern: Tensor, grad_pattern: Tensor) -> Tensor:
        """dQ/dT from dQ/dP."""

    @staticmethod
    @abstractmethod
    def project(t: Tensor, gradient: Tensor) -> Tensor:
        """The gradient projected onto the tangent space of the constraint at T."""

    @staticmethod
    @abstractmethod
    def retract(x: Tensor) -> Tensor:
        """The nearest point of the constraint set to X."""


class _Orthogonal(_Geometry):
    """T^T T = I: P = A T, the tangent projection removes the symmetric part of T^T G, and the
    retraction is the polar factor U V^T of X = U S V^T (Jennrich, 2001)."""

    @staticmethod
    def loadings(a: Tensor, t: Tensor) -> Tensor:
        return a @ t

    @staticmethod
    def gradient(a: Tensor, t: Tensor, pattern: Tensor, grad_pattern: Tensor) -> Tensor:
        return a.T @ grad_pattern

    @staticmethod
    def project(t: Tensor, gradient: Tensor) -> Tensor:
        m = t.T @ gradient
        return gradient - t @ (m + m.T) / 2

    @staticmethod
    def retract(x: Tensor) -> Tensor:
        u, _, vh = torch.linalg.svd(x)
        return u @ vh


class _Oblique(_Geometry):
    """diag(T^T T) = 1: P = A T^(-T), dQ/dT = -T^(-T) (dQ/dP)^T P, the tangent projection
    removes each column's component along itself, and the retraction normalises the columns
    (Jennrich, 2002)."""

    @staticmethod
    def loadings(a: Tensor, t: Tensor) -> Tensor:
        return torch.linalg.solve(t, a.T).T

    @staticmethod
    def gradient(a: Tensor, t: Tensor, pattern: Tensor, grad_pattern: Tensor) -> Tensor:
        return -torch.linalg.solve(t.T, grad_pattern.T @ pattern)

    @staticmethod
    def project(t: Tensor, gradient: Tensor) -> Tensor:
        return gradient - t * (t * gradient).sum(0)

    @staticmethod
    def retract(x: Tensor) -> Tensor:
        return x / x.norm(dim=0)


def gradient_projection(
    a: Tensor, criterion: Criterion, geometry: type[_Geometry], tol: float, max_iter: int
) -> Tensor:
    """Minimise ``criterion`` over T on ``geometry`` from T = I (GPForth / GPFoblq)."""
    t = torch.eye(a.shape[1], dtype=a.dtype, device=a.device)
    pattern = geometry.loadings(a, t)
    value, grad_pattern = criterion(pattern)
    gradient = geometry.gradient(a, t, pattern, grad_pattern)
    alpha = 1.0
    for _ in range(max_iter):
        projected = geometry.project(t, gradient)
        norm2 = (projected**2).sum().item()
        if norm2 < tol**2:
            return t
        alpha *= 2
        for _ in range(LINE_SEARCH_HALVINGS):
            candidate = geometry.retract(t - alpha * projected)
            pattern = geometry.loadings(a, candidate)
            new_value, grad_pattern = criterion(pattern)
            if new_value < value - 0.5 * norm2 * alpha:
                break
            alpha /= 2
        t, value = candidate, new_value
        gradient = geometry.gradient(a, t, pattern, grad_pattern)
    warnings.warn(
        f"rotation: gradient projection did not converge in {max_iter} iterations (projected "
        f"gradient norm {norm2**0.5:.3g} > tol {tol:g}); raise max_iter or tol",
        RuntimeWarning,
        stacklevel=3,
    )
    return t


class GradientProjection(RotationMethod):
    """A rotation that minimises a criterion Q(P) by gradient projection."""

    @abstractmethod
    def criterion(self, loadings: Tensor) -> tuple[Tensor, Tensor]:
        """Q(P) and its gradient dQ/dP (D x M)."""

    def transform(self, loadings: Tensor, tol: float, max_iter: int) -> Tensor:
        geometry = _Oblique if self.oblique else _Orthogonal
        return gradient_projection(loadings, self.criterion, geometry, tol, max_iter)


def _others_in_row(squares: Tensor) -> Tensor:
    """L2 N with N = 1 1^T - I: each entry replaced by the sum of the other entries of its row."""
    return squares.sum(1, keepdim=True) - squares


@register_rotation("varimax")
class Varimax(GradientProjection):
    """Varimax (Kaiser, 1958): maximise the variance of the squared loadings in each column,
    Q = -1/4 ||L^2 - column means of L^2||^2, so each factor has a few large loadings."""

    oblique = False

    def criterion(self, loadings: Tensor) -> tuple[Tensor, Tensor]:
        squares = loadings**2
        centred = squares - squares.mean(0)
        return -(centred**2).sum() / 4, -loadings * centred


@register_rotation("quartimax")
class Quartimax(GradientProjection):
    """Quartimax: Q = -1/4 sum L^4, so each feature loads on as few factors as possible (it
    tends to give one general factor)."""

    oblique = False

    def criterion(self, loadings: Tensor) -> tuple[Tensor, Tensor]:
        return -(loadings**4).sum() / 4, -(loadings**3)


@register_rotation("equamax")
class Equamax(GradientProjection):
    """Equamax: the Crawford-Ferguson criterion with kappa = M / (2 D), between quartimax
    (kappa = 0, simple rows) and varimax (kappa = 1 / D, simple columns),

    Q = (1 - kappa)/4 sum L^2 * (L^2 N) + kappa/4 sum L^2 * (M' L^2), N = 1 1^T - I (M x M),
    M' = 1 1^T - I (D x D): squared loadings penalised against the others in their row and in
    their column.
    """

    oblique = False

    def criterion(self, loadings: Tensor) -> tuple[Tensor, Tensor]:
        dim, latent = loadings.shape
        kappa = latent / (2 * dim)
        squares = loadings**2
        rows = _others_in_row(squares)
        columns = squares.sum(0) - squares
        value = ((1 - kappa) * (squares * rows).sum() + kappa * (squares * columns).sum()) / 4
        return value, loadings * ((1 - kappa) * rows + kappa * columns)


@register_rotation("oblimin")
class Oblimin(GradientProjection):
    """Direct oblimin (Jennrich & Sampson, 1966): Q = 1/4 sum L^2 * ((I - gamma/D 1 1^T) L^2 N),
    the covariances of the squared loadings of different factors. ``gamma`` = 0 is quartimin.
    On the pattern (direct oblimin, as GPArotation and SPSS's delta) a larger gamma gives more
    correlated factors and a negative one less; values near 1 can fail to converge.

    Args:
        gamma: the obliqueness parameter (GPArotation's ``gam``).
    """

    oblique = True

    def __init__(self, gamma: float = 0.0) -> None:
        self.gamma = gamma

    def criterion(self, loadings: Tensor) -> tuple[Tensor, Tensor]:
        squares = loadings**2
        others = _others_in_row(squares)
        if self.gamma != 0:
            others = others - self.gamma * others.mean(0)
        return (squares * others).sum() / 4, loadings * others


@register_rotation("quartimin")
class Quartimin(Oblimin):
    """Quartimin (Carroll, 1953): oblimin with gamma = 0."""

    def __init__(self) -> None:
        super().__init__(gamma=0.0)


@register_rotation("geomin")
class Geomin(GradientProjection):
    """Geomin (Yates, 1987), oblique: Q = sum over features of the geometric mean of
    (L^2 + epsilon) across factors, small when each feature has a near-zero loading somewhere.

    Args:
        epsilon: keeps the criterion smooth at zero loadings (GPArotation's ``delta``, 0.01).
    """

    oblique = True

    def __init__(self, epsilon: float = 0.01) -> None:
        self.epsilon = epsilon

    def criterion(self, loadings: Tensor) -> tuple[Tensor, Tensor]:
        shifted = loadings**2 + self.epsilon
        geometric = shifted.log().mean(1, keepdim=True).exp()
        gradient = (2 / loadings.shape[1]) * loadings / shifted * geometric
        return geometric.sum(), gradient


@register_rotation("promax")
class Promax(RotationMethod):
    """Promax (Hendrickson & White, 1964): varimax, then the least-squares oblique T that takes
    the varimax loadings X closest to the target X |X|^(power - 1) (which shrinks small
    loadings more than large ones), its columns rescaled so that Phi has a unit diagonal.

    With Kaiser normalisation (:func:`rotate`'s default) the target is formed from the
    row-normalised varimax loadings, as psych's ``fa(rotate="promax")`` and factor_analyzer do;
    R's ``stats::promax`` normalises inside varimax only and forms the target from the
    de-normalised loadings, so its solutions differ slightly.

    Args:
        power: the exponent of the target (4, as in R and factor_analyzer).
    """

    oblique = True

    def __init__(self, power: float = 4.0) -> None:
        self.power = power

    def transform(self, loadings: Tensor, tol: float, max_iter: int) -> Tensor:
        varimax = Varimax().transform(loadings, tol, max_iter)
        x = loadings @ varimax
        target = x * x.abs() ** (self.power - 1)
        u = torch.linalg.lstsq(x, target).solution
        u = u * torch.linalg.inv(u.T @ u).diagonal().sqrt()
        # the pattern is A R with R = T_varimax U, so T = R^(-T) and Phi = R^-1 R^-T
        return torch.linalg.inv(varimax @ u).T


def rotate(
    loadings: Tensor,
    method: str | RotationMethod = "varimax",
    *,
    normalize: bool = True,
    tol: float = 1e-6,
    max_iter: int = 10_000,
    **options: float,
) -> Rotation:
    """Rotate unrotated loadings A (D x M) by a registered method, then order and sign the
    factors.

    Kaiser normalisation (``normalize``) rotates the rows of A scaled to unit length and scales
    the result back (GPArotation's ``normalize=TRUE``), so features with small communalities
    weigh as much as the others. Afterwards the factors are ordered by decreasing variance
    explained, diag(Phi P^T P) (the sum over features of pattern times structure loadings; the
    column sums of squares when orthogonal; psych's order), and each factor's sign is chosen so
    that its pattern loadings sum to a positive value; Phi and T are permuted and signed with
    them, so P = A T^(-T) and Phi = T^T T still hold.

    Args:
        loadings: unrotated loadings A (D x M), e.g. ``FactorAnalysis.loadings``, or the same
            standardised to the correlation scale.
        method: a name in :data:`ROTATIONS` (``varimax``, ``quartimax``, ``equamax``,
            ``oblimin``, ``quartimin``, ``geomin``, ``promax``) or a :class:`RotationMethod`.
        normalize: Kaiser normalisation.
        tol: stop gradient projection once the projected gradient's norm is below this
            (GPArotation's ``eps`` is 1e-5). The line search compares criterion values, so
            below about 1e-7 round-off in Q stalls it and the iterations run out.
        max_iter: most gradient-projection iterations (a warning says when they run out).
        **options: the method's arguments, e.g. ``gamma`` for oblimin, ``epsilon`` for geomin,
            ``power`` for promax.

    Raises:
        ConfigError: the method's name is unknown (the message lists the available ones).
    """
    rotator = ROTATIONS.build(method, **options)
    latent = loadings.shape[1]
    eye = torch.eye(latent, dtype=loadings.dtype, device=loadings.device)
    if latent < 2:
        return _order_and_sign(Rotation(loadings, eye, eye))
    norms = loadings.norm(dim=1, keepdim=True) if normalize else torch.ones_like(loadings[:, :1])
    norms = torch.where(norms > 0, norms, torch.ones_like(norms))
    t = rotator.transform(loadings / norms, tol, max_iter)
    if rotator.oblique:
        rotation = Rotation(_Oblique.loadings(loadings, t), t.T @ t, t)
    else:
        rotation = Rotation(loadings @ t, eye, t)
    return _order_and_sign(rotation)


def explained_variance(loadings: Tensor, phi: Tensor) -> Tensor:
    """Variance of the features explained by each factor, diag(Phi P^T P) (M): the sum over
    features of pattern times structure loadings, as psych reports for oblique solutions. It
    sums to the total communality tr(P Phi P^T); for orthogonal factors it is the column sums
    of squares."""
    return ((loadings @ phi) * loadings).sum(0)


def _order_and_sign(rotation: Rotation) -> Rotation:
    """Factors by decreasing :func:`explained_variance`, each signed to a positive loading sum."""
    order = torch.argsort(explained_variance(rotation.loadings, rotation.phi), descending=True)
    pattern = rotation.loadings[:, order]
    signs = torch.where(pattern.sum(0) < 0, -1.0, 1.0).to(pattern)
    return Rotation(
        pattern * signs,
        rotation.phi[order][:, order] * signs[:, None] * signs,
        rotation.rotation[:, order] * signs,
    )
