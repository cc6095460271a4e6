r"""Mixed precision on the host CPU: the float64 Gram matrix of float32 rows, for route ``"gram"``.

Leverage of an ill-conditioned float32 row matrix ``A`` (``n × m``) by route ``"gram"`` (one Cholesky
factor of the Gram matrix, one pass of rows) needs the Gram matrix to more precision than float32: its
rounding ``eps₃₂·‖G‖`` moves the leverage by ``~eps₃₂·κ(G_eq)`` (route ``"gram"`` in float32 stops at
``κ(G_eq)`` = 840, :func:`nlis_jax._precondition.one_step_ratio_min`) and swamps the small eigenvalues
beyond, which is why wide matrices the column screen flags (``κ(G_eq) > eps₃₂^{-1/4}``) take the
three-product shifted route (:mod:`nlis_jax._precondition`). Accumulated in float64
instead (a product of two float32 numbers is exact in float64), ``G`` carries rounding
``~eps₆₄·‖G‖``, and ``U = A D⁻¹L⁻ᵀ`` is orthonormal to ``~eps₆₄·κ(G_eq)``.

On a CPU, BLAS's float64 ``syrk`` runs at about half its float32 speed, while XLA's float64 matrix
product runs at a fifth of its float32 one (benchmarks/README.md, (g)): so the float64 Gram matrix is
taken by BLAS on the host through scipy, chunk by chunk (float64 copies of :data:`HOST_CHUNK_BYTES` of
rows at a time), and the Cholesky factor, its inverse and the conditioning estimate follow in float64 on
the ``m × m`` matrix. The row pass ``‖A T‖²`` is a float32 ``trmm`` on the host as well
(:func:`host_row_norms`): its rounding, ``~eps₃₂·κ(A)``, is of the order the input's own rounding
already causes in the leverage. Two passes over ``A`` in all, one of them in float64, against three
float32 products of ``A``'s size on the sketched route.

:func:`float64_gram_transform` accepts the result only when ``A D⁻¹`` has full numerical rank for
``rtol`` (``σ_min/σ_max > 2·rtol``, as the shifted route asks) and ``eps₆₄·κ(G_eq) ≤ eps^{3/4}`` of
``A``'s dtype: the orthogonality error route ``"gram"`` accepts in that dtype. Otherwise (NaN or Inf,
column norms whose squares over- or underflow in ``A``'s dtype, a failed factorisation, rank deficiency,
``κ`` beyond the bound) it returns ``None`` and the caller goes on to the shifted and stable routes.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import scipy.linalg
import scipy.linalg.blas
import scipy.linalg.lapack

from nlis_jax._checks import held_on_cpu
from nlis_jax._precondition import CHECK_ITERS, norms_in_range

#: Bytes of rows per chunk of the host passes (760 float64 rows of 1,378 columns).
HOST_CHUNK_BYTES = 1 << 23


class HostTransform(NamedTuple):
    """``U = A transform`` is orthonormal (route ``"gram"`` with a float64 Gram matrix)."""

    transform: np.ndarray  # (m, m) upper triangular R⁻¹ (AᵀA = RᵀR), in A's dtype
    rank: int  # m minus the exactly-zero columns
    ratio: float  # σ_min/σ_max of A D⁻¹ (estimate)


def on_host_cpu(A) -> bool:
    """Whether ``A`` is a float32 ``jax.Array`` on one CPU device of this process.

    Not an array sharded over several CPU devices: its scores would come back on one device (the
    routes keep them row-sharded), and its Gram matrix is then an all-reduce of the shards anyway.
    """
    return held_on_cpu(A) and len(A.sharding.device_set) == 1 and A.dtype == np.float32


def host_float64_gram(A) -> np.ndarray:
    """The upper triangle of ``AᵀA`` in float64 (the lower one is zero) of an ``(n, m)`` row matrix, by
    BLAS ``dsyrk`` on the host, :data:`HOST_CHUNK_BYTES` of float64 rows at a time (the float64 copy of
    ``A`` is never whole; ``A`` itself is read, not modified)."""
    a = np.asarray(A)
    n, m = a.shape
    rows = max(1, HOST_CHUNK_BYTES // (8 * m))
    G = np.zeros((m, m), order="F")  # dsyrk adds each chunk's cᵀc to the upper triangle, in place
    for start in range(0, n, rows):  # chunks of rows, not examples
        c = a[start : start + rows].astype(np.float64)  # (k, m) in C order = cᵀ (m, k) in Fortran order
        G = scipy.linalg.blas.dsyrk(1.0, c.T, beta=1.0, c=G, trans=0, lower=0, overwrite_c=1)
    return G


def host_row_norms(A, T: np.ndarray) -> np.ndarray:
    """``‖(A T)_i‖²`` for an upper-triangular ``T`` in ``A``'s dtype: BLAS ``trmm`` on row chunks of
    :data:`HOST_CHUNK_BYTES` (on this CPU 0.18–0.20 s against 0.24–0.26 s for XLA's split triangular
    product, 20,000 × 1,378 float32)."""
    a = np.asarray(A)
    n, m = a.shape
    trmm = scipy.linalg.blas.get_blas_funcs("trmm", dtype=a.dtype)
    rows = max(1, HOST_CHUNK_BYTES // (a.dtype.itemsize * m))
    h = np.empty(n, a.dtype)
    for start in range(0, n, rows):  # chunks of rows, not examples
        c = a[start : start + rows].copy()  # cᵀ in Fortran order, overwritten by Tᵀcᵀ = (c T)ᵀ
        b = trmm(1.0, T, c.T, side=0, lower=0, trans_a=1, overwrite_b=1)
        h[start : start + rows] = np.einsum("ij,ij->j", b, b)
    return h


def _largest_eigenvalue(apply, m: int) -> float:
    """Rayleigh quotient after ``CHECK_ITERS`` power iterations on the SPD operator ``apply`` (numpy on
    the host: the iteration of :func:`nlis_jax._precondition.largest_eigenvalue`, from the same start)."""
    x = 1.0 + np.arange(m, dtype=np.float32) / m
    x /= np.linalg.norm(x)
    for _ in range(CHECK_ITERS):  # iterations on an m-vector (O(m²) each), not over examples
        y = apply(x)
        x = y / np.linalg.norm(y)
    return float(x @ apply(x))


def float64_gram_transform(A, rtol: float) -> HostTransform | None:
    """Route ``"gram"``'s transform from the float64 Gram matrix of ``A`` (module docstring).

    ``G = AᵀA = RᵀR`` (float64, :func:`host_float64_gram`; LAPACK ``dpotrf`` on its upper triangle,
    in place), ``T = R⁻¹`` (``dtrtri``), so that ``A T`` is orthonormal. This is route ``"gram"``'s
    ``D⁻¹L⁻ᵀ`` without forming ``G_eq``: with ``D`` the column norms, ``R D⁻¹`` is the Cholesky factor of
    ``G_eq = D⁻¹GD⁻¹`` and ``D⁻¹(R D⁻¹)⁻¹ = R⁻¹`` (Cholesky's rounding is relative to ``√(G_ii G_jj)``, so
    the column scales need no equilibration first). Exactly-zero columns get ``G_ii = 1``: their column
    of ``A T`` stays zero and they leave the rank. ``κ(G_eq) = σ_max(R D⁻¹)² · σ_max(D R⁻¹)²``, each by
    power iteration. Returns ``None`` when the result is not to be trusted (see the module docstring).
    """
    G = host_float64_gram(A)
    if not np.all(np.isfinite(G)):
        return None
    sq = np.diag(G).copy()
    zero = sq == 0
    # T = R⁻¹ scales like 1/‖column‖ and is applied in A's dtype: the squared column norms must lie where
    # an unscaled Gram matrix of that dtype is as good as a prescaled one (cast, they over- or underflow
    # out of that range)
    with np.errstate(over="ignore"):  # a norm past A's range becomes inf: out of range, as it should
        narrow = jnp.asarray(sq.astype(A.dtype))
    if not np.all(zero | np.asarray(norms_in_range(narrow, A.shape[0]))):
        return None
    G[np.diag_indices_from(G)] = np.where(zero, 1.0, sq)
    d32 = np.sqrt(np.diag(G)).astype(np.float32)
    R, status = scipy.linalg.lapack.dpotrf(G, lower=0, clean=1, overwrite_a=1)
    if status != 0:
        return None
    Rinv, status = scipy.linalg.lapack.dtrtri(R, lower=0)
    if status != 0:
        return None
    m = R.shape[0]
    # two digits suffice: float32 copies halve what each matrix-vector product reads
    R32, Rinv32, inv_d2 = R.astype(np.float32), Rinv.astype(np.float32), 1 / np.square(d32)
    lam_max = _largest_eigenvalue(lambda x: R32 @ ((x @ R32) * inv_d2), m)  # (RD⁻¹)(RD⁻¹)ᵀ
    inv_lam_min = _largest_eigenvalue(lambda x: d32 * (Rinv32 @ ((d32 * x) @ Rinv32)), m)  # (DR⁻¹)(DR⁻¹)ᵀ
    kappa = lam_max * inv_lam_min
    if not (np.isfinite(kappa) and kappa > 0):
        return None
    ratio = float(1.0 / np.sqrt(kappa))
    if ratio <= 2 * rtol or np.finfo(np.float64).eps * kappa > float(np.finfo(A.dtype).eps) ** 0.75:
        return None
    return HostTransform(Rinv.astype(A.dtype), int(m - np.sum(zero)), ratio)
