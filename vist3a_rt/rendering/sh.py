"""Real spherical harmonics, degrees 0-4, in the convention of 3DGS and gsplat.

Coefficient ``k = l*l + l + m`` (``m = -l..l``) multiplies the orthonormal real harmonic
``Y_l^m``; the DC term is ``k = 0``. The associated Legendre functions carry the
Condon-Shortley phase ``(-1)^m``, which is where the familiar signs come from
(``Y_1^-1 = -0.4886 y``, ``Y_1^0 = 0.4886 z``, ``Y_1^1 = -0.4886 x``). For ``m > 0`` the
real harmonic uses ``cos(m phi)``, for ``m < 0`` ``sin(|m| phi)``, each with a factor sqrt(2).

The basis is built from two recurrences instead of a table of constants, so every degree
follows from the same definition:

* ``Q_l^m(z) = P_l^m(z) / (1 - z^2)^(m/2)``, a polynomial in z (reduced Legendre function);
* ``C_m + i S_m = (x + i y)^m = sin(theta)^m * exp(i m phi)`` for a unit direction.

so that ``Y_l^{+-m} = N_l^m * Q_l^m(z) * (C_m | S_m)``.
"""

from __future__ import annotations

import math

import torch

from ..errors import Vist3AInputError

MAX_SH_DEGREE = 4
SH_C0 = 0.28209479177387814  # Y_0^0 = 1 / (2 sqrt(pi)); colour = SH_C0 * dc + 0.5


def sh_degree_from_count(num_coeffs: int) -> int:
    """The SH degree d of a coefficient count K = (d+1)^2; raises unless 1 <= K <= 25 is a square."""
    degree = math.isqrt(max(num_coeffs, 0)) - 1
    if num_coeffs < 1 or (degree + 1) ** 2 != num_coeffs:
        raise Vist3AInputError(
            f"sh must have K = (degree+1)^2 coefficients per colour (1, 4, 9, 16 or 25), got K={num_coeffs}")
    if degree > MAX_SH_DEGREE:
        raise Vist3AInputError(
            f"sh degree {degree} (K={num_coeffs}) is above the supported maximum {MAX_SH_DEGREE} (K=25)")
    return degree


def _normalization(l: int, m: int) -> float:
    """N_l^m for m >= 0: unit L2 norm on the sphere; sqrt(2) more for the real cos/sin pair."""
    k = math.sqrt((2 * l + 1) / (4 * math.pi) * math.factorial(l - m) / math.factorial(l + m))
    return k if m == 0 else math.sqrt(2.0) * k


def _reduced_legendre(degree: int, z: torch.Tensor) -> dict[tuple[int, int], torch.Tensor]:
    """Q_l^m(z) for 0 <= m <= l <= degree, with the Condon-Shortley phase."""
    q: dict[tuple[int, int], torch.Tensor] = {}
    for m in range(degree + 1):
        # P_m^m = (-1)^m (2m-1)!! (1-z^2)^(m/2): its reduced form is a constant.
        double_factorial = math.prod(range(2 * m - 1, 0, -2))
        q[m, m] = torch.full_like(z, (-1) ** m * double_factorial)
        if m + 1 <= degree:
            q[m + 1, m] = (2 * m + 1) * z * q[m, m]
        for l in range(m + 2, degree + 1):
            q[l, m] = ((2 * l - 1) * z * q[l - 1, m] - (l + m - 1) * q[l - 2, m]) / (l - m)
    return q


def _azimuthal(degree: int, x: torch.Tensor, y: torch.Tensor) -> tuple[list, list]:
    """C_m, S_m = Re, Im of (x + i y)^m for m = 0..degree (polynomials, exact at the poles)."""
    cos_terms, sin_terms = [torch.ones_like(x)], [torch.zeros_like(x)]
    for _ in range(degree):
        c, s = cos_terms[-1], sin_terms[-1]
        cos_terms.append(x * c - y * s)
        sin_terms.append(x * s + y * c)
    return cos_terms, sin_terms


def sh_basis(degree: int, dirs: torch.Tensor) -> torch.Tensor:
    """All real SH basis functions up to ``degree`` at unit directions.

    dirs: [..., 3] unit vectors (not normalised here). Returns [..., (degree+1)^2].
    """
    if not 0 <= degree <= MAX_SH_DEGREE:
        raise Vist3AInputError(f"sh degree must be in 0..{MAX_SH_DEGREE}, got {degree}")
    x, y, z = dirs.unbind(-1)
    q = _reduced_legendre(degree, z)
    cos_terms, sin_terms = _azimuthal(degree, x, y)
    columns = []
    for l in range(degree + 1):
        for m in range(-l, l + 1):
            trig = cos_terms[m] if m >= 0 else sin_terms[-m]
            columns.append(_normalization(l, abs(m)) * q[l, abs(m)] * trig)
    return torch.stack(columns, dim=-1)


def eval_sh(
    sh: torch.Tensor,  # [N, K, C] coefficients, DC first
    dirs: torch.Tensor,  # [N, 3] view directions, any nonzero length
) -> torch.Tensor:  # [N, C]
    """Evaluate SH of the degree given by K along ``dirs`` (normalised here). Raw value: no +0.5."""
    degree = sh_degree_from_count(sh.shape[-2])
    unit = torch.nn.functional.normalize(dirs, dim=-1)
    basis = sh_basis(degree, unit)  # [N, K]
    return torch.einsum("nk,nkc->nc", basis, sh)
