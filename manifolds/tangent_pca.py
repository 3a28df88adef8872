"""Streaming principal component analysis of tangent vectors.

The accumulator keeps only Σ v vᵀ (D × D) and the number of vectors, so it
takes one pass over data of any size, merges across batches and reduces
across distributed ranks. ``solve`` then runs one ``torch.linalg.eigh``.
The second moment is not centred: feed vectors whose mean is the base point's
log (zero at the Fréchet mean) if you want the usual covariance.
"""

import dataclasses
import logging
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["TangentPCA", "TangentPCAResult"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TangentPCAResult:
    """Principal subspace returned by :meth:`TangentPCA.solve`.

    Attributes:
        basis: Orthonormal basis U of shape (D, k), columns ordered by
            decreasing eigenvalue. Orthogonal to the base point when one was given.
        eigenvalues: The k largest eigenvalues of the mean second moment
            Σ v vᵀ / count (after removing the base point), shape (k,), decreasing.
        energy: Fraction of the total eigenvalue sum that the k kept eigenvalues capture.
        k: Number of kept directions.
        count: Number of vectors accumulated.
    """

    basis: torch.Tensor
    eigenvalues: torch.Tensor
    energy: float
    k: int
    count: int


def _complement_basis(point: torch.Tensor) -> torch.Tensor:
    """Return an orthonormal basis (D, D - 1) of the hyperplane orthogonal to a unit vector.

    Uses the Householder reflection H that maps ``point`` to ∓e_j with j the
    largest coordinate, so ‖v‖² ≥ 2 and there is no cancellation. The columns of H
    are orthonormal and column j is ±point, so the other columns span point^⊥.
    """
    dim = point.shape[0]
    pivot = int(point.abs().argmax())
    sign = 1.0 if point[pivot] >= 0 else -1.0
    householder_vector = point.clone()
    householder_vector[pivot] += sign
    reflection = torch.eye(dim, dtype=point.dtype, device=point.device)
    reflection -= 2.0 * torch.outer(householder_vector, householder_vector) / householder_vector.dot(householder_vector)
    keep = [index for index in range(dim) if index != pivot]
    return reflection[:, keep]


class TangentPCA:
    """Streaming accumulator of Σ v vᵀ over tangent vectors, and its eigen-solver.

    Typical use: call :meth:`update` on each batch of tangent vectors (for
    example ``Sphere().logmap(mu, features)``), optionally :meth:`merge` or
    :meth:`all_reduce`, then :meth:`solve`.

    Sampling: with ``max_samples`` set, at most that many rows are used. The
    accumulator needs the number of rows it will see (``total``) in advance.
    At construction it draws a subset of exactly min(max_samples, total) row
    indices from range(total) with ``torch.randperm`` seeded by ``seed``. The
    rows passed to :meth:`update` are numbered consecutively from 0 across
    calls, and only rows whose number is in the subset are added. The result
    therefore depends only on ``seed``, ``total`` and the order of the rows,
    not on the batch sizes. Passing more than ``total`` rows raises ValueError.
    The mask costs one byte per row of ``total``. With several ranks, each rank
    samples its own stream, so give each rank its own ``total`` and its share of
    ``max_samples``.

    Args:
        dim: Dimension D of the vectors.
        dtype: Accumulation dtype. float64 by default, because Σ v vᵀ over
            millions of rows loses digits in float32.
        device: Device of the accumulator. Defaults to the CPU.
        max_samples: Maximum number of rows to use, or None to use all rows.
        total: Number of rows that :meth:`update` will receive. Required with
            ``max_samples``.
        seed: Seed of the row subset.

    Raises:
        ValueError: If an argument is out of range, or ``max_samples`` is given
            without ``total``.
    """

    def __init__(
        self,
        dim: int,
        *,
        dtype: torch.dtype = torch.float64,
        device: Optional[torch.device] = None,
        max_samples: Optional[int] = None,
        total: Optional[int] = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not dtype.is_floating_point or torch.finfo(dtype).bits < 32:
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        self.dim = dim
        self._sum = torch.zeros(dim, dim, dtype=dtype, device=device)
        self._count = 0
        self._rows_seen = 0
        self._keep_mask: Optional[torch.Tensor] = None
        self.total = total

        if max_samples is not None:
            if not isinstance(max_samples, int) or max_samples < 1:
                raise ValueError(f"max_samples must be a positive int or None, got {max_samples!r}")
            if total is None:
                raise ValueError(
                    "max_samples needs total, the number of rows update() will receive, "
                    "to draw the row subset in advance"
                )
            if not isinstance(total, int) or total < 1:
                raise ValueError(f"total must be a positive int, got {total!r}")
            if max_samples < total:
                generator = torch.Generator().manual_seed(seed)
                chosen = torch.randperm(total, generator=generator)[:max_samples]
                self._keep_mask = torch.zeros(total, dtype=torch.bool)
                self._keep_mask[chosen] = True

    @property
    def count(self) -> int:
        """Number of vectors accumulated so far."""
        return self._count

    @property
    def second_moment_sum(self) -> torch.Tensor:
        """Accumulated Σ v vᵀ of shape (D, D), not divided by the count."""
        return self._sum

    def update(self, vectors: torch.Tensor) -> "TangentPCA":
        """Add the rows of ``vectors`` to Σ v vᵀ and the count.

        Args:
            vectors: Tangent vectors of shape (N, D), any floating dtype and device.

        Returns:
            This accumulator.

        Raises:
            ValueError: If the shape is wrong or, with sampling, more than
                ``total`` rows have been passed.
        """
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"vectors must have shape (N, {self.dim}), got {tuple(vectors.shape)}")
        rows = vectors.shape[0]
        if self.total is not None and self._rows_seen + rows > self.total:
            raise ValueError(
                f"update() received {self._rows_seen + rows} rows in total, more than total={self.total}; "
                "pass the true row count as total"
            )
        vectors = vectors.detach().to(device=self._sum.device, dtype=self._sum.dtype)
        if self._keep_mask is not None:
            keep = self._keep_mask[self._rows_seen : self._rows_seen + rows].to(vectors.device)
            vectors = vectors[keep]
        self._rows_seen += rows
        self._sum += vectors.T @ vectors
        self._count += vectors.shape[0]
        return self

    def merge(self, other: "TangentPCA") -> "TangentPCA":
        """Add another accumulator's Σ v vᵀ and count to this one.

        Only the sums and counts are merged. Each accumulator keeps its own
        row numbering for sampling.

        Args:
            other: Accumulator with the same dimension.

        Returns:
            This accumulator.

        Raises:
            ValueError: If the dimensions differ.
        """
        if other.dim != self.dim:
            raise ValueError(f"cannot merge a TangentPCA of dim {other.dim} into one of dim {self.dim}")
        self._sum += other._sum.to(device=self._sum.device, dtype=self._sum.dtype)
        self._count += other._count
        return self

    def all_reduce(self) -> "TangentPCA":
        """Sum Σ v vᵀ and the count over all distributed ranks, in place.

        Uses ``torch.distributed.all_reduce`` when the default process group is
        initialised, and does nothing otherwise. Call it once, after the last
        :meth:`update`, on every rank. A second call would add the global sums
        again. With the NCCL backend the accumulator must be on the rank's GPU.

        Returns:
            This accumulator.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return self
        dist.all_reduce(self._sum)
        count = torch.tensor([self._count], dtype=torch.int64, device=self._sum.device)
        dist.all_reduce(count)
        self._count = int(count.item())
        logger.debug("all_reduce: %d vectors over %d ranks", self._count, dist.get_world_size())
        return self

    def solve(self, energy: float, k_max: int, *, base_point: Optional[torch.Tensor] = None) -> TangentPCAResult:
        """Return the smallest principal subspace that captures the energy fraction ``energy``.

        Runs ``torch.linalg.eigh`` on Σ v vᵀ / count and keeps the smallest k whose
        eigenvalues' share of the total reaches ``energy``, capped at ``k_max``.
        The share is compared with a tolerance of D·eps of the accumulation
        dtype, so that ``energy=1.0`` stops at the numerical rank instead of
        taking directions with zero eigenvalue.

        With ``base_point`` μ, the matrix is first restricted to the hyperplane
        orthogonal to μ̂ = μ/‖μ‖. This equals using (I − μ̂μ̂ᵀ)Σ(I − μ̂μ̂ᵀ), but
        without its zero eigenvalue along μ̂. So U is orthogonal to μ̂ up to
        rounding error, even when fewer than k directions have nonzero energy. Then k ≤ D − 1.

        Args:
            energy: Target fraction of the eigenvalue sum, in (0, 1].
            k_max: Maximum number of directions, 1 ≤ k_max ≤ D.
            base_point: Optional point μ of shape (D,) to make U orthogonal to.

        Returns:
            The basis, eigenvalues, captured energy, k and count.

        Raises:
            ValueError: If an argument is out of range, no vectors were
                accumulated, the sum is not finite or all vectors are zero
                (after removing μ).
        """
        if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0.0 < energy <= 1.0:
            raise ValueError(f"energy must be a fraction in (0, 1], got {energy!r}")
        if isinstance(k_max, bool) or not isinstance(k_max, int) or not 1 <= k_max <= self.dim:
            raise ValueError(f"k_max must be an int in [1, {self.dim}] (the dimension), got {k_max!r}")
        if self._count == 0:
            raise ValueError("TangentPCA has no vectors (count=0); call update() with data before solve()")
        if not torch.isfinite(self._sum).all():
            raise ValueError("the accumulated Σ v vᵀ contains NaN or inf; check the vectors passed to update()")

        moment = self._sum / self._count
        moment = 0.5 * (moment + moment.T)
        if base_point is None:
            frame = None
        else:
            frame = self._base_point_frame(base_point)
            moment = frame.T @ moment @ frame

        eigenvalues, eigenvectors = torch.linalg.eigh(moment)
        eigenvalues = eigenvalues.flip(0).clamp_min(0.0)
        eigenvectors = eigenvectors.flip(1)
        if frame is not None:
            eigenvectors = frame @ eigenvectors

        total_energy = eigenvalues.sum()
        if total_energy <= 0:
            raise ValueError(
                f"all {self._count} accumulated vectors are zero"
                + (" after removing the base point" if frame is not None else "")
                + "; there is no principal direction"
            )
        shares = eigenvalues.cumsum(0) / total_energy
        tolerance = self.dim * torch.finfo(moment.dtype).eps
        reached = torch.nonzero(shares >= energy - tolerance)
        k = int(reached[0]) + 1 if reached.numel() else eigenvalues.shape[0]
        k = min(k, k_max, eigenvalues.shape[0])
        return TangentPCAResult(
            basis=eigenvectors[:, :k].contiguous(),
            eigenvalues=eigenvalues[:k].clone(),
            energy=min(float(shares[k - 1]), 1.0),
            k=k,
            count=self._count,
        )

    def _base_point_frame(self, base_point: torch.Tensor) -> torch.Tensor:
        if base_point.shape != (self.dim,):
            raise ValueError(f"base_point must have shape ({self.dim},), got {tuple(base_point.shape)}")
        point = base_point.detach().to(device=self._sum.device, dtype=self._sum.dtype)
        norm = torch.linalg.vector_norm(point)
        if not torch.isfinite(norm) or norm == 0:
            raise ValueError(f"base_point must be finite and nonzero, got norm {norm.item()}")
        if self.dim < 2:
            raise ValueError("base_point needs dim ≥ 2, because its orthogonal complement is empty in 1-D")
        return _complement_basis(point / norm)

    def __repr__(self) -> str:
        sampling = "" if self._keep_mask is None else f", sampling {int(self._keep_mask.sum())} of {self.total}"
        return f"TangentPCA(dim={self.dim}, count={self._count}, dtype={self._sum.dtype}{sampling})"

