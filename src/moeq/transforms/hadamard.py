"""Hadamard matrices and random orthogonal rotations, generated (no stored constants).

A Hadamard matrix H_n has entries +-1 and H H^T = n I, so H / sqrt(n) is orthogonal. QuaRot rotates
the residual stream by Q = diag(s) H / sqrt(n) with random signs s; the rotation spreads outlier
channels over all channels (incoherence) and is exactly undone by the next linear (W -> W Q).

Orders are built as Kronecker products H_m (x) H_{2^k}:

* 2^k: Sylvester's construction, applied in O(n log n) by the fast Walsh-Hadamard butterfly;
* m = q + 1 for a prime q = 3 (mod 4): Paley construction I (Jacobsthal matrix of q);
* m = 2(q + 1) for a prime q = 1 (mod 4): Paley construction II.

That covers the widths of common MoE models (e.g. 1408 = 44 * 32, 14336 = 28 * 512, 768 = 12 * 64,
18944 = 148 * 128). For an order no construction reaches (a Hadamard matrix needs n = 1, 2 or 4t, and
prime-power Paley orders are not generated), :func:`random_rotation` falls back to a random
orthogonal matrix (QR of a Gaussian): still exactly function-preserving, just a dense matrix. The
report records which kind was used. Everything is float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i) with chi the quadratic character mod the prime q. -> (q, q) float64."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q  # (q, q) j - i mod q
    return chi[idx]


def _paley(m: int) -> torch.Tensor | None:
    """A +-1 Hadamard matrix of order m from Paley I or II with a prime q, or None."""
    if m % 4:
        return None
    q = m - 1
    if _is_prime(q) and q % 4 == 3:  # Paley I: H = I + [[0, 1^T], [-1, Q]]
        S = torch.zeros(m, m, dtype=torch.float64)
        S[0, 1:], S[1:, 0], S[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
        return S + torch.eye(m, dtype=torch.float64)
    q = m // 2 - 1
    if _is_prime(q) and q % 4 == 1:  # Paley II: conference matrix C (symmetric), H = C(x)A + I(x)B
        C = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        C[0, 1:], C[1:, 0], C[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
        A = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        B = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(C, A) + torch.kron(torch.eye(q + 1, dtype=torch.float64), B)
    return None


@lru_cache(maxsize=None)
def factor(n: int) -> tuple[int, int] | None:
    """(m, p) with n = m * p, p a power of two and H_m constructible (m = 1 or Paley), else None."""
    p = n & -n  # largest power of two dividing n
    while p >= 1:
        m = n // p
        if m == 1 or _paley(m) is not None:
            return m, p
        p //= 2
    return None


@lru_cache(maxsize=32)
def _small(m: int) -> torch.Tensor:
    return torch.ones(1, 1, dtype=torch.float64) if m == 1 else _paley(m)


def _fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform over the last dim (a power of two): x @ H_p (Sylvester)."""
    p = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < p:
        y = x.reshape(*lead, p // (2 * h), 2, h)  # butterfly pairs (i, i + h) in blocks of 2h
        x = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2)
        h *= 2
    return x.reshape(*lead, p)


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """x @ H_n / sqrt(n) over the last dim, H_n = H_m (x) H_p; raises if n has no construction."""
    n = x.shape[-1]
    f = factor(n)
    if f is None:
        raise ValueError(f"no Hadamard construction of order {n}")
    m, p = f
    X = x.reshape(*x.shape[:-1], m, p)  # (..., m, p): row index a*p + b
    X = _fwht(X)  # (..., m, p) X @ H_p
    if m > 1:
        X = torch.einsum("...ap,ac->...cp", X, _small(m).to(X.dtype))  # H_m^T X
    return X.reshape(x.shape) / n ** 0.5


def hadamard_matrix(n: int) -> torch.Tensor:
    """The orthonormal Hadamard matrix H_n / sqrt(n) (n, n) float64."""
    return hadamard_transform(torch.eye(n, dtype=torch.float64))


@dataclass
class Rotation:
    """An orthogonal Q (n, n): diag(signs) H_n / sqrt(n) when a Hadamard order exists, else ``dense``."""

    n: int
    signs: torch.Tensor | None = None  # (n,) +-1 float64
    dense: torch.Tensor | None = None  # (n, n) float64 orthogonal (fallback)

    @property
    def kind(self) -> str:
        return "hadamard" if self.dense is None else "random-orthogonal"

    def apply(self, x: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """x @ Q over the last dim, computed in ``dtype`` (float64 for weights; the activations' own
        dtype for online use) and returned in x's dtype."""
        xc = x.to(dtype)
        if self.dense is not None:
            y = xc @ self.dense.to(device=x.device, dtype=dtype)
        else:
            y = hadamard_transform(xc * self.signs.to(device=x.device, dtype=dtype))
        return y.to(x.dtype)

    def matrix(self) -> torch.Tensor:
        return self.apply(torch.eye(self.n, dtype=torch.float64))  # (n, n)


def random_rotation(n: int, seed: int = 0, random_signs: bool = True) -> Rotation:
    """QuaRot's randomised Hadamard Q = diag(s) H_n / sqrt(n) (s = 1 when ``random_signs`` is False), or a
    seeded random orthogonal matrix where no Hadamard order n can be constructed."""
    g = torch.Generator().manual_seed(seed)
    if factor(n) is not None:
        s = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1 if random_signs else \
            torch.ones(n, dtype=torch.float64)
        return Rotation(n, signs=s)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    Qm, R = torch.linalg.qr(A)
    return Rotation(n, dense=Qm * torch.sign(torch.diagonal(R))[None, :])  # (n, n) Haar-distributed
