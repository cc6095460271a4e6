"""Two routes to the same leverage agree (findings of a cross-check audit, 2026-12-02): a user's ``rtol``
decides the rank whatever route the conditioning suggests; projected leverage of a wide, rank-deficient
``Y = F̃Ω`` is exact; a fast route forced on input it cannot handle raises instead of giving probabilities
that do not sum to 1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import matrix_with_condition

import nlis_jax as nj

RNG = np.random.default_rng(0)


def _svd_leverage(A, rtol):
    """Leverage and rank of the column-equilibrated rows of ``A`` over singular values above
    ``rtol·σ_max`` (the documented rank), by numpy."""
    A = np.asarray(A).reshape(-1, np.shape(A)[-1])
    norms = np.linalg.norm(A, axis=0)
    U, s, _ = np.linalg.svd(A / np.where(norms > 0, norms, 1), full_matrices=False)
    keep = s > rtol * s[0]
    return np.sum(U[:, keep] ** 2, axis=1), int(np.sum(keep))


def _spectrum(n, sigmas):
    Q, _ = np.linalg.qr(RNG.standard_normal((n, len(sigmas))))
    V, _ = np.linalg.qr(RNG.standard_normal((len(sigmas),) * 2))
    return Q @ np.diag(sigmas) @ V.T


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-4), (np.float64, 0.05), (np.float32, 1e-2)])
def test_user_rtol_decides_the_rank_on_every_route(dtype, rtol):
    """A matrix the fast routes would take (κ small for float64: σ ratio 3e-6 is still route "gram2") with
    one singular value below ``rtol``: the rank and scores are those of the stable route and of numpy."""
    F = _spectrum(40, [1.0, 0.5, 0.3, 0.1, rtol / 30]).astype(dtype)
    want, rank = _svd_leverage(F.astype(np.float64), rtol)
    assert rank == 4
    for route in (None, "stable"):
        info = nj.leverage_scores(F, rtol=rtol, route=route, return_info=True)
        assert int(info.rank) == 4, route
        np.testing.assert_allclose(info.leverage, want, atol=1e-5 if dtype == np.float32 else 1e-12)
    # the default rtol keeps all five directions (the fast routes, unchanged)
    assert int(nj.leverage_scores(F, return_info=True).rank) == 5


def test_streaming_leverage_follows_rtol():
    """The same rule from a Gram matrix accumulated in chunks (device and host data)."""
    xs = RNG.standard_normal((30, 4))
    ys = 1e-7 * RNG.standard_normal(30)  # the offset column nearly in the span of the others

    def f(p, x):
        return x @ p

    params = np.array([0.3, -0.2, 0.5, 0.1])
    F = np.asarray(nj.dual_matrix(f, params, xs, ys, num_nodes=4))
    for rtol in (1e-12, 1e-3):
        want, rank = _svd_leverage(F, rtol)
        for data in ((xs, ys), (jnp.asarray(xs), jnp.asarray(ys))):
            info = nj.streaming_leverage_scores(
                f, params, *data, chunk_size=8, num_nodes=4, rtol=rtol, return_info=True
            )
            assert int(info.rank) == rank
            np.testing.assert_allclose(info.leverage, want, atol=1e-10)


@pytest.mark.parametrize("embedding", ["sparse", "gaussian"])
@pytest.mark.parametrize("k", [1, 2])
def test_projected_leverage_of_a_wide_rank_deficient_projection(embedding, k):
    """``Y = F̃Ω`` with fewer rows than columns (``n·k < dim``) and rank(F̃) < n·k: the leverage of ``Y``
    equals the exact leverage of F̃ (it was uniform: rounding-noise columns of a QR were counted)."""
    xs = jnp.asarray(RNG.standard_normal((6, 4)))
    ys = jnp.asarray(RNG.standard_normal((6,) if k == 1 else (6, 2)))

    def f(p, x):  # p enters through w1 + w2 only: rank(F̃) < p + 1
        z = x @ (p["w1"] + p["w2"])
        return jnp.tanh(z) if k == 1 else jnp.stack([jnp.tanh(z), z])

    params = {"w1": jnp.asarray(RNG.standard_normal(4)), "w2": jnp.asarray(RNG.standard_normal(4))}
    F = nj.dual_matrix(f, params, xs, ys, num_nodes=16)
    want, rank = _svd_leverage(F, 1e-12)
    want = want.reshape(6, -1).sum(axis=1)
    assert rank < 6 * k < 16  # Y = F̃Ω is wide: n·k rows, dim = 16 columns
    got = nj.projected_leverage_scores(
        jax.random.key(1), f, params, xs, ys, dim=16, num_nodes=16, embedding=embedding, return_info=True
    )
    assert int(got.rank) == rank
    np.testing.assert_allclose(got.leverage, want, atol=1e-10)


def test_forced_fast_route_on_rank_deficient_input_raises():
    A = RNG.standard_normal((13, 3))
    F = np.c_[A, A @ RNG.standard_normal((3, 2))]  # rank 3 of 5 columns
    for route in ("gram", "gram2"):
        with pytest.raises(
            ValueError, match=f'route="{route}" was forced on a matrix that is rank-deficient'
        ):
            nj.leverage_scores(F, route=route)
        with pytest.raises(ValueError, match=f'route="{route}" was forced'):
            nj.orthonormal_basis(F, route=route)
    want, rank = _svd_leverage(F, 1e-12)
    info = nj.leverage_scores(F, route="stable", return_info=True)
    assert int(info.rank) == rank == 3
    np.testing.assert_allclose(info.leverage, want, atol=1e-12)
    full = RNG.standard_normal((13, 5))  # full rank, well conditioned: the forced fast routes are exact
    for route in ("gram", "gram2"):
        np.testing.assert_allclose(
            nj.leverage_scores(full, route=route), _svd_leverage(full, 1e-12)[0] / 5, rtol=1e-10
        )


def test_forced_fast_route_in_the_streaming_scores_raises():
    xs = RNG.standard_normal((20, 2))

    def f(p, x):  # p[2] and p[3] only through their sum: a rank-deficient dual matrix
        return jnp.tanh(x @ p[:2]) + (p[2] + p[3]) * x[0]

    params = np.array([0.3, -0.2, 0.5, 0.1])
    for data in (xs, jnp.asarray(xs)):
        with pytest.raises(ValueError, match='route="gram" was forced'):
            nj.streaming_leverage_scores(f, params, data, chunk_size=8, num_nodes=4, route="gram")


def test_basis_names_an_unknown_route():
    """routes.basis used directly with a route name it does not know failed with "tuple.index(x): x not in
    tuple" deep inside; it is the ValueError of leverage_scores, naming the routes."""
    A = jnp.asarray(np.random.default_rng(0).standard_normal((20, 3)))
    with pytest.raises(ValueError, match="route"):
        nj.routes.basis(A, jnp.asarray(1e-12), route="fast")


@pytest.mark.parametrize("rtol", [float("nan"), 0.0, -1e-6, 1.0, 2.0])
def test_basis_refuses_a_tolerance_outside_0_1(rtol):
    """routes.basis used directly took a NaN or out-of-range rtol silently (rank 0 for NaN or 1, every
    column for 0); leverage_scores checked it, basis and row_leverage did not."""
    A = jnp.asarray(np.random.default_rng(0).standard_normal((20, 3)))
    with pytest.raises(ValueError, match="rtol must lie in .0, 1."):
        nj.routes.basis(A, jnp.asarray(rtol))
    with pytest.raises(ValueError, match="rtol must lie in .0, 1."):
        nj.routes.row_leverage(A, jnp.asarray(rtol), (20,))
    U, rank, _ = nj.routes.basis(A, jnp.asarray(1e-12))  # in range: the basis of the 3 columns
    assert int(rank) == 3 and np.allclose(np.asarray(U).T @ np.asarray(U), np.eye(3), atol=1e-12)


@pytest.mark.parametrize("dtype, kappa", [(np.float32, 1e4), (np.float64, 1e7)])
def test_forced_fast_route_beyond_its_conditioning_limit_raises(dtype, kappa):
    """A forced fast route on a full-rank matrix past what it can handle (routes.fast_route_ratio_min,
    κ(G_eq) > 1/(1000·eps)) gave scores up to 49% off that did not sum to 1 (float32, κ(F)
    = 1e4; float64, κ = 1e7: 3.5e-3 off, sums 0.99987–1.00037) with no error; now a ValueError (or, where
    the float32 Gram matrix cannot resolve the smallest eigenvalue, the rank-deficient one). The
    automatic route stays exact to the dtype's accuracy."""
    for seed in range(4):
        rng = np.random.default_rng(seed)
        F = matrix_with_condition(rng, 400, 12, kappa)[0].astype(dtype)
        want = _svd_leverage(F.astype(np.float64), 1e-12)[0] / 12
        for route in ("gram",) if dtype == np.float32 else ("gram", "gram2"):
            assert kappa**-2 < nj.routes.fast_route_ratio_min(route, dtype)  # past the limit, 1/κ(G) = κ⁻²
            with pytest.raises(
                ValueError, match=f'route="{route}" was forced on a matrix (too ill|that is rank)'
            ):
                nj.leverage_scores(jnp.asarray(F), route=route)
        got = np.asarray(nj.leverage_scores(jnp.asarray(F)), np.float64)
        # float32: the accuracy bar for ill-conditioned duals (smallest ratio ≥ 0.999); float64:
        # the reference's own error is ~κ·eps (2e-9), the two differ by up to ~7κ·eps
        np.testing.assert_allclose(got, want, rtol=1e-3 if dtype == np.float32 else 50 * kappa * 2.2e-16)


def _fixed_rank_leverage(A, rank):
    """Leverage of the columns-equilibrated rows of ``A`` over its top ``rank`` singular values (numpy)."""
    norms = np.linalg.norm(A, axis=0)
    U = np.linalg.svd(A / np.where(norms > 0, norms, 1), full_matrices=False)[0]
    return np.sum(U[:, :rank] ** 2, axis=1)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_stable_route_gradient_with_a_zero_column_and_any_direction(dtype):
    """Route "stable" differentiated its Householder QR and SVD: an exactly-zero column (a dead unit of a
    bias-free ReLU net) made jax.grad of the scores NaN and Inf. Now the derivative of the projector at
    fixed rank, dh_i = 2⟨[(I − P) dA A⁺]_i, U_i⟩ (stable_leverage's custom_jvp), in every direction that
    leaves the zero column at zero, including ones that raise the rank: against a central difference of
    the top-r SVD leverage of the equilibrated matrix, for the automatic and the forced route, in reverse
    and forward mode; float32 against the float64 derivative."""
    rng = np.random.default_rng(3)
    B = rng.normal(size=(50, 2)) @ rng.normal(size=(2, 6))  # rank 2
    B = np.c_[B, np.zeros(50)]  # and a zero column
    E = rng.normal(size=B.shape)
    E[:, -1] = 0
    i = int(np.argmax(_fixed_rank_leverage(B, 2)))
    fd = (_fixed_rank_leverage(B + 1e-6 * E, 2)[i] - _fixed_rank_leverage(B - 1e-6 * E, 2)[i]) / 2e-6 / 2
    assert abs(fd) > 1e-3  # a direction that moves the score
    for route in (None, "stable"):
        score = lambda F, route=route: nj.leverage_scores(F, route=route)[i]  # noqa: E731
        g = np.asarray(jax.grad(score)(jnp.asarray(B, dtype)), np.float64)
        assert np.all(np.isfinite(g)), route
        assert np.all(g[:, -1] == 0)
        forward = float(jax.jvp(score, (jnp.asarray(B, dtype),), (jnp.asarray(E, dtype),))[1])
        # float64: the central difference's own error (step² and eps/step ~1e-10); float32: its rounding
        # of B (eps·κ of the rank-2 part, a few 1e-6 relative) in a derivative of order 1
        rtol = 1e-6 if dtype == np.float64 else 1e-3
        np.testing.assert_allclose([np.sum(g * E), forward], [fd, fd], rtol=rtol)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_wide_route_gradient_with_a_zero_row_and_any_direction(dtype):
    """Fewer rows than columns (routes.wide_basis): jax.grad of the scores differentiated the QR of
    ``(A D⁻¹)ᵀ``, whose R has a zero on its diagonal for a zero row of ``A``: every entry NaN. Now the
    derivative of the projector at fixed rank (wide_leverage's custom_jvp), against a central difference
    of the top-r SVD leverage of the equilibrated matrix in any direction (the zero row moved too), in
    reverse and forward mode; 0 on a matrix of full row rank (certified: every leverage 1)."""
    rng = np.random.default_rng(5)
    B = rng.normal(size=(6, 2)) @ rng.normal(size=(2, 15))  # rank 2 of 6 rows
    B[4] = 0
    E = rng.normal(size=B.shape)
    i = 1
    fd = (_fixed_rank_leverage(B + 1e-6 * E, 2)[i] - _fixed_rank_leverage(B - 1e-6 * E, 2)[i]) / 2e-6 / 2
    assert abs(fd) > 1e-3  # a direction that moves the score
    score = lambda F: nj.leverage_scores(F)[i]  # noqa: E731
    g = np.asarray(jax.grad(score)(jnp.asarray(B, dtype)), np.float64)
    assert np.all(np.isfinite(g))
    forward = float(jax.jvp(score, (jnp.asarray(B, dtype),), (jnp.asarray(E, dtype),))[1])
    rtol = 1e-6 if dtype == np.float64 else 1e-3  # as for route "stable" above
    np.testing.assert_allclose([np.sum(g * E), forward], [fd, fd], rtol=rtol)
    full = jnp.asarray(rng.normal(size=(6, 15)), dtype)
    assert np.all(np.asarray(jax.grad(lambda F: nj.leverage_scores(F)[0])(full)) == 0)
    # the basis itself (orthonormal_basis): a finite derivative with the zero row, as before the QR
    basis = jax.grad(lambda F: jnp.sum(nj.orthonormal_basis(F)[0][:, :2] ** 3))(jnp.asarray(B, dtype))
    assert np.all(np.isfinite(np.asarray(basis)))


def test_reverse_mode_gradient_on_rank_deficient_input_is_finite():
    """The routes factor the Gram matrix before choosing; on rank-deficient input the factor is NaN and
    unused (route "stable"), but its derivative put NaN into every entry of jax.grad of the automatic
    route's scores. Now the stable route's gradient, matching forward mode and a central difference of an
    SVD reference along a rank-preserving direction; full-rank input (route "gram") as before."""
    rng = np.random.default_rng(8)
    R = rng.normal(size=(2, 5))
    B, E = rng.normal(size=(60, 2)) @ R, rng.normal(size=(60, 2)) @ R  # rank 2, and a direction keeping it

    def svd_score(F):
        return _svd_leverage(F, 1e-10)[0][0] / 2

    fd = (svd_score(B + 1e-6 * E) - svd_score(B - 1e-6 * E)) / 2e-6
    for route in (None, "stable"):
        score = lambda F, route=route: nj.leverage_scores(F, route=route)[0]  # noqa: E731
        g = jax.grad(score)(jnp.asarray(B))
        assert np.all(np.isfinite(np.asarray(g))), route
        forward = jax.jvp(score, (jnp.asarray(B),), (jnp.asarray(E),))[1]
        np.testing.assert_allclose([float(jnp.sum(g * E)), float(forward)], [fd, fd], rtol=1e-6)
    full = rng.normal(size=(60, 5))
    D = rng.normal(size=(60, 5))
    fd = (
        (_svd_leverage(full + 1e-6 * D, 1e-10)[0][0] - _svd_leverage(full - 1e-6 * D, 1e-10)[0][0]) / 2e-6 / 5
    )
    g = jax.grad(lambda F: nj.leverage_scores(F)[0])(jnp.asarray(full))
    np.testing.assert_allclose(float(jnp.sum(g * D)), fd, rtol=1e-6)
    # an exactly-zero column (a dead unit's gradients) stays out of the rank: the derivative of the
    # equilibration's sqrt(0) made the whole gradient NaN; now the other columns' gradient, 0 on it
    Z = full.copy()
    Z[:, 2] = 0
    g = np.asarray(jax.grad(lambda F: nj.leverage_scores(F)[0])(jnp.asarray(Z)))
    kept = np.delete(Z, 2, axis=1)
    want = np.asarray(jax.grad(lambda F: nj.leverage_scores(F)[0])(jnp.asarray(kept)))
    np.testing.assert_allclose(np.delete(g, 2, axis=1), want, rtol=1e-10, atol=1e-14)
    assert np.all(g[:, 2] == 0)


def test_stable_route_with_a_block_of_zero_rows_between_data_rows():
    # Rank 6 in 1,100 columns, its 1,100 zero rows between the 12th and 13th data row: the CPU's float64
    # QR gave NaN for such a block (nlis_jax.routes.zero_rows_last), reported as "FᵀF overflows float64".
    rng = np.random.default_rng(1)
    m = 1100
    data = rng.standard_normal((24, 6)) @ rng.standard_normal((6, m))
    F = np.vstack([data[:12], np.zeros((m, m)), data[12:]])
    ref, r = _svd_leverage(F, 1e-10)
    out = nj.leverage_scores(jnp.asarray(F), return_info=True)
    assert int(out.rank) == r == 6 and nj.routes.ROUTES[int(out.route)] == "stable"
    np.testing.assert_allclose(out.leverage, ref, rtol=0, atol=1e-12)  # row by row: Q's rows back in order


def test_wide_matrix_with_a_block_of_zero_columns_between_data_columns():
    # 550 × 1,100 (fewer rows than columns: routes.wide_basis), 8 data columns, 1,084 zero
    # columns, 8 data columns: the CPU's float64 SVD came back NaN ("FᵀF overflows" from leverage_scores,
    # "the dual matrix is all zeros (rank 0)" from orthonormal_basis). Sparse columns, as one-hot features
    # never active in the sample. The fault depends on the values, not on the pattern alone (other seeds
    # passed): these are the draws of the case found failing, after three sparser ones.
    rng = np.random.default_rng(1)
    for nonzeros in (1, 2, 8, 64):
        C = np.zeros((550, 16))
        for j in range(16):
            C[rng.choice(550, nonzeros, replace=False), j] = rng.standard_normal(nonzeros)
    F = np.hstack([C[:, :8], np.zeros((550, 1084)), C[:, 8:]])
    ref, r = _svd_leverage(F, 1e-10)
    out = nj.leverage_scores(jnp.asarray(F), return_info=True)
    assert int(out.rank) == r == 16
    np.testing.assert_allclose(out.leverage, ref, rtol=0, atol=1e-12)
    U, rank, _ = nj.orthonormal_basis(jnp.asarray(F))
    np.testing.assert_allclose(U[:, :16].T @ U[:, :16], np.eye(16), rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.sum(np.square(U), axis=1), ref, rtol=0, atol=1e-12)


def test_a_failed_factorization_is_not_called_rank_zero(monkeypatch):
    """NaN from a route on finite input (a failed SVD gives NaN singular values, none kept: rank 0) was
    reported by ``orthonormal_basis`` as "the dual matrix is all zeros"."""

    def failed(rows, rtol, route=None):
        return jnp.full(rows.shape, jnp.nan, rows.dtype), jnp.int32(0), jnp.int32(2)

    monkeypatch.setattr(nj.routes, "basis", failed)
    with pytest.raises(ValueError, match="F is finite but its leverage \\(or basis\\) came out NaN"):
        nj.orthonormal_basis(jnp.asarray(RNG.standard_normal((20, 3))))


def test_float32_duplicated_column_is_not_counted_in_the_rank():
    """Route "shifted" bounds σ_min/σ_max from its transform, which in float32 cannot see an exactly
    dependent column: in 11 of 60 random 300 × 6 matrices with one column duplicated its rank test passed,
    the rank came out 6 with the duplicate's direction of U near zero, and the probabilities summed to
    5/6 (sample then refused them; the streamed dual matrix of a linear model: 17 of 60, summing to 0.8).
    The output's Σh = ‖U‖_F² now shows the lost direction and the rank-revealing route is taken."""
    rng = np.random.default_rng(0)
    taken = set()
    for _ in range(60):
        F = rng.standard_normal((300, 6)).astype(np.float32)
        a, b = rng.choice(6, 2, replace=False)
        F[:, b] = F[:, a]
        lev = nj.leverage_scores(F, return_info=True)
        taken.add(nj.routes.ROUTES[int(lev.route)])
        assert int(lev.rank) == 5
        np.testing.assert_allclose(float(jnp.sum(lev.probs)), 1.0, rtol=1e-5)
        U, rank, _ = nj.orthonormal_basis(F)
        assert int(rank) == 5
        np.testing.assert_allclose(np.linalg.norm(np.asarray(U)[:, :5], axis=0), 1.0, rtol=1e-5)
    assert taken == {"stable"}  # float32: "shifted" is chosen for such input, and now falls back

    def model(theta, x):
        return x @ theta

    theta = jnp.ones(5, jnp.float32)
    for _ in range(20):
        X = rng.standard_normal((400, 5)).astype(np.float32)
        a, b, z = rng.choice(5, 3, replace=False)
        X[:, b], X[:, z] = X[:, a], 0.0
        y = jnp.asarray(rng.standard_normal(400), jnp.float32)
        dense = nj.leverage_scores(nj.dual_matrix(model, theta, jnp.asarray(X), y), return_info=True)
        streamed = nj.streaming_leverage_scores(
            model, theta, jnp.asarray(X), y, chunk_size=128, return_info=True
        )
        assert int(dense.rank) == int(streamed.rank) == 4
        np.testing.assert_allclose(streamed.probs, dense.probs, rtol=1e-3, atol=1e-7)
        np.testing.assert_allclose(float(jnp.sum(streamed.probs)), 1.0, rtol=1e-5)
