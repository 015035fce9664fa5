"""Orthogonal matrices for rotations: randomized Hadamard (QuaRot) for any size with a known construction.

A Hadamard matrix of order n exists only for n = 1, 2 or a multiple of 4, and there is no single recipe for all
of them. We build ``H_k ⊗ H_{2^m}`` with the Sylvester ``H_{2^m}`` and a Paley ``H_k`` (Paley I: k = q + 1 for a
prime q ≡ 3 mod 4, e.g. 12, 20, 24, 44; Paley II: k = 2(q + 1) for a prime q ≡ 1 mod 4, e.g. 12, 28, 36, 60).
The split n = k · 2^m with the largest power of two that leaves a constructible k is used, so:

==============  =========  =======================================
size            SmolLM2    matrix
==============  =========  =======================================
hidden 576      9 · 64     H_36 (Paley II, q = 17) ⊗ H_16
intermediate    1536       H_12 (Paley I, q = 11) ⊗ H_128
head_dim 64     2^6        H_64 (Sylvester)
==============  =========  =======================================

Sizes with no such split (e.g. 9·2^m needs k = 9, 18: none exist) fall back to a random orthogonal matrix
(QR of a Gaussian, sign-corrected so it is Haar distributed); `rotation_info` says which one a size gets.

The randomized Hadamard is ``Q = diag(s) · H / sqrt(n)`` with seeded signs s ∈ {±1}^n, applied to row vectors
as ``x Q = (x ⊙ s) H / sqrt(n)`` (in column-vector form ``Qᵀ x = Hᵀ diag(s) x``: QuaRot's "H·diag(s)", the
signs act first). As flat as H (every entry ±1/sqrt(n)), so a rotated vector spreads each outlier over all
channels, and different seeds give rotations that quantize differently. (Signs applied *after* H would be
invisible: symmetric per-token and per-channel quantizers are invariant to flipping a channel's sign.)
Everything is built in float64 and cast by the caller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch

__all__ = [
    "KINDS",
    "check_kind",
    "HadamardFactors",
    "hadamard_factors",
    "hadamard_matrix",
    "random_orthogonal",
    "random_signs",
    "rotation_info",
    "rotation_matrix",
]

KINDS = ("hadamard", "random")  # randomized Hadamard (QuaRot) | Haar-random orthogonal (QR)


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j - i) with χ the quadratic character mod the prime q: (q, q) of 0, ±1."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q  # (q, q): j - i mod q
    return chi[idx]


def _paley1(q: int) -> torch.Tensor:
    """Hadamard of order q + 1 for a prime q ≡ 3 mod 4: I + S with S = [[0, 1ᵀ], [-1, Q]] skew-symmetric."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
    return s + torch.eye(q + 1, dtype=torch.float64)


def _paley2(q: int) -> torch.Tensor:
    """Hadamard of order 2(q + 1) for a prime q ≡ 1 mod 4, from the conference matrix C = [[0, 1ᵀ], [1, Q]]."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


def _paley(k: int) -> torch.Tensor | None:
    """A ±1 Hadamard matrix of order k from a Paley construction, or None if neither applies."""
    if k == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if _is_prime(k - 1) and (k - 1) % 4 == 3:
        return _paley1(k - 1)
    if k % 2 == 0 and _is_prime(k // 2 - 1) and (k // 2 - 1) % 4 == 1:
        return _paley2(k // 2 - 1)
    return None


def _sylvester(p: int) -> torch.Tensor:
    """±1 Hadamard of order p = 2^m (Sylvester, natural order)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@dataclass(frozen=True)
class HadamardFactors:
    """H_n = H_k ⊗ H_p (p = 2^m), both ±1; what `OnlineHadamard` applies as two small matmuls."""

    k: int
    p: int

    @property
    def n(self) -> int:
        return self.k * self.p


@cache
def hadamard_factors(n: int) -> HadamardFactors | None:
    """The split n = k · 2^m (largest 2^m) with a Paley-constructible k, or None when there is none."""
    if n < 1:
        raise ValueError(f"a rotation needs a positive size, got {n}")
    p = 1 << ((n & -n).bit_length() - 1)  # largest power of two dividing n
    while p >= 1:
        if _paley(n // p) is not None:
            return HadamardFactors(n // p, p)
        p //= 2
    return None


@cache
def _factor_matrices(k: int, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _paley(k), _sylvester(p)


def hadamard_matrix(n: int) -> torch.Tensor:
    """A ±1 Hadamard matrix of order n (float64, H Hᵀ = n I); ValueError if no construction is known."""
    f = hadamard_factors(n)
    if f is None:
        raise ValueError(f"no Hadamard construction known for size {n}; use kind='random'")
    a, b = _factor_matrices(f.k, f.p)
    return torch.kron(a, b)  # (n, n)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A Haar-random orthogonal (n, n) float64 matrix: QR of a seeded Gaussian, columns sign-fixed by diag(R)."""
    g = torch.randn(n, n, generator=_generator(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(r))[None, :]  # (n, n)


def random_signs(n: int, seed: int) -> torch.Tensor:
    """Seeded ±1 vector of length n (float64)."""
    return torch.randint(0, 2, (n,), generator=_generator(seed)).to(torch.float64).mul_(2).sub_(1)


def check_kind(kind: str) -> None:
    """One error line for a rotation kind that is not one of `KINDS` (config validation and every builder)."""
    if kind not in KINDS:
        raise ValueError(f"unknown rotation kind {kind!r}; expected one of {KINDS}")


def rotation_info(n: int, kind: str = "hadamard") -> str:
    """What `rotation_matrix(n, kind)` builds, in words (for logs and docs)."""
    check_kind(kind)
    f = hadamard_factors(n) if kind == "hadamard" else None
    if f is None:
        return f"random orthogonal (QR) {n}"
    return f"randomized Hadamard H_{f.k} ⊗ H_{f.p}" if f.k > 1 else f"randomized Hadamard H_{f.p}"


def rotation_matrix(n: int, kind: str = "hadamard", seed: int = 0) -> torch.Tensor:
    """A seeded orthogonal (n, n) float64 matrix: randomized Hadamard diag(s)·H/sqrt(n), or random orthogonal.

    `kind="hadamard"` falls back to a random orthogonal matrix for sizes with no Hadamard construction.
    """
    check_kind(kind)
    if kind == "random" or hadamard_factors(n) is None:
        return random_orthogonal(n, seed)
    return random_signs(n, seed)[:, None] * hadamard_matrix(n) / math.sqrt(n)  # (n, n): diag(s) H / sqrt(n)
