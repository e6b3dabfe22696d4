"""FID statistics: Gaussian mean and covariance of features in float64 (step 6) and the Frechet distance (step 7)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from t2i_ds.atomic import atomic_open


@dataclass
class GaussianStats:
    """Mean (D,) and unbiased covariance (D, D), float64, of n feature vectors, with provenance."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    meta: dict = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> None:
        """Write an .npz (mu, sigma, n, meta as JSON) through a temporary file and an atomic rename."""
        with atomic_open(path, "wb") as f:  # a file object: np.savez must not append ".npz" to the name
            np.savez(f, mu=self.mu, sigma=self.sigma, n=np.int64(self.n), meta=np.array(json.dumps(self.meta)))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "GaussianStats":
        """An .npz written by `save`, or any .npz with `mu` and `sigma` (clean-fid's; n unknown: -1)."""
        try:
            with np.load(path, allow_pickle=False) as z:
                if "mu" not in z or "sigma" not in z:
                    raise ValueError(f"{path} has no 'mu' and 'sigma' arrays (keys: {sorted(z.keys())})")
                n = int(z["n"]) if "n" in z else -1
                meta = json.loads(str(z["meta"])) if "meta" in z else {}
                mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
        except (OSError, EOFError) as e:  # zipfile/np errors for a damaged or foreign file
            raise ValueError(f"{path} is not a readable .npz of FID statistics: {e}") from e
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not (D,) and (D, D)")
        return cls(mu, sigma, n, meta)


class RunningStats:
    """Streaming mean and covariance in float64, shifted by the first batch's mean for accuracy."""

    def __init__(self):
        self.n, self.shift, self.s1, self.s2 = 0, None, None, None

    def update(self, feats: torch.Tensor) -> None:
        x = feats.detach().to("cpu", torch.float64).reshape(feats.shape[0], -1)  # (B, D)
        if self.shift is None:
            self.shift = x.mean(0)  # (D,)
            self.s1 = torch.zeros_like(self.shift)
            self.s2 = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
        x = x - self.shift
        self.s1 += x.sum(0)  # (D,)
        self.s2 += x.T @ x  # (D, D)
        self.n += x.shape[0]

    def result(self, meta: dict | None = None) -> GaussianStats:
        if self.n < 2:
            raise ValueError(f"FID statistics need at least 2 images, got {self.n}")
        mean = self.s1 / self.n  # (D,) mean of the shifted features
        sigma = (self.s2 - self.n * torch.outer(mean, mean)) / (self.n - 1)  # (D, D) unbiased
        sigma = (sigma + sigma.T) / 2  # exactly symmetric
        return GaussianStats((self.shift + mean).numpy(), sigma.numpy(), self.n, dict(meta or {}))


def _clamp_roundoff(w: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a symmetric PSD matrix with those below D * eps * max|w| set to 0.

    That threshold is numpy's matrix_rank / pinv tolerance: below it an eigenvalue cannot be told apart
    from the rounding error of the decomposition. A rank-deficient covariance (n <= D images) has
    exact zeros that round-off turns into +-1e-16-sized values: clamping them gives no NaN from a
    negative square root, and zeroing the tiny positive ones removes their sqrt(round-off) error.
    """
    tol = w.shape[0] * torch.finfo(w.dtype).eps * w.abs().max()
    return torch.where(w > tol, w, torch.zeros_like(w))


def trace_sqrt_product(sigma1: np.ndarray | torch.Tensor, sigma2: np.ndarray | torch.Tensor) -> float:
    """Tr((S1 S2)^{1/2}) = Tr((A S2 A)^{1/2}) = sum sqrt(eig(A S2 A)), A = S1^{1/2}, in float64.

    S1 S2 = A (A S2) and A S2 A = (A S2) A have the same eigenvalues (XY and YX do), and A S2 A is
    symmetric PSD, so `eigh` applies: no non-symmetric sqrtm, no complex parts, no scipy.
    Cost at D = 2048 on 2 CPU cores: 10-25 s (one eigh, one eigvalsh, three matmuls); negligible on a
    GPU host next to sampling 30k images.
    """
    s1 = torch.as_tensor(sigma1, dtype=torch.float64)
    s2 = torch.as_tensor(sigma2, dtype=torch.float64)
    w1, v1 = torch.linalg.eigh((s1 + s1.T) / 2)  # (D,), (D, D)
    a = (v1 * _clamp_roundoff(w1).sqrt()) @ v1.T  # (D, D) S1^{1/2}
    m = a @ s2 @ a  # (D, D) A S2 A
    w = _clamp_roundoff(torch.linalg.eigvalsh((m + m.T) / 2))  # (D,) its eigenvalues, >= 0
    return float(w.sqrt().sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 0.0) -> float:
    """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2}) between N(mu1, S1) and N(mu2, S2), float64.

    eps: added to both diagonals (clean-fid's fallback uses 1e-6 when scipy's sqrtm fails). Not needed
    here: rank deficiency is handled inside the eigendecompositions (`_clamp_roundoff`), so the default 0
    leaves full-rank results exact.
    """
    mu1 = torch.as_tensor(mu1, dtype=torch.float64)
    mu2 = torch.as_tensor(mu2, dtype=torch.float64)
    s1 = torch.as_tensor(sigma1, dtype=torch.float64)
    s2 = torch.as_tensor(sigma2, dtype=torch.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(f"statistics do not match: mu {tuple(mu1.shape)} vs {tuple(mu2.shape)}, "
                         f"sigma {tuple(s1.shape)} vs {tuple(s2.shape)}")
    if eps:
        s1 = s1 + eps * torch.eye(s1.shape[0], dtype=torch.float64)
        s2 = s2 + eps * torch.eye(s2.shape[0], dtype=torch.float64)
    diff = mu1 - mu2
    return float(diff @ diff + torch.trace(s1) + torch.trace(s2)) - 2 * trace_sqrt_product(s1, s2)
