"""orthogonalize against a float64 NumPy Newton-Schulz and against the exact SVD."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from reference import JORDAN, newton_schulz

import muonjax
from muonjax.optim.newton_schulz import resolve_coefficients


def _random(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _with_singular_values(rows, cols, values, seed=0):
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((rows, rows)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, cols)))
    s = np.zeros((rows, cols))
    k = min(rows, cols)
    s[np.arange(k), np.arange(k)] = values
    return (u @ s @ v.T).astype(np.float32)


def _singular_values(x):
    return np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)


def _polar(x):
    u, _, vt = np.linalg.svd(np.asarray(x, np.float64), full_matrices=False)
    return u @ vt


@pytest.mark.parametrize(
    "shape", [(32, 32), (48, 64), (24, 80), (80, 24), (3, 16, 40), (2, 3, 20, 12)]
)
@pytest.mark.parametrize("name", ["jordan", "polar_express"])
def test_matches_float64_reference(shape, name):
    x = _random(shape)
    table, safety = resolve_coefficients(name, 5)
    expected = newton_schulz(x, table, safety)
    got = np.asarray(muonjax.orthogonalize(jnp.asarray(x), ns_coeffs=name))
    assert got.shape == x.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5 * np.abs(expected).max())


def test_singular_values_of_random_full_rank_inputs():
    x = _random((128, 256), seed=1)
    s_jordan = _singular_values(muonjax.orthogonalize(x))
    s_polar = _singular_values(muonjax.orthogonalize(x, ns_coeffs="polar_express"))
    assert 0.6 <= s_jordan.min() and s_jordan.max() <= 1.25
    assert 0.8 <= s_polar.min() and s_polar.max() <= 1.16
    # "tighter": the worst deviation from 1 is at most half of Jordan's
    assert np.abs(s_polar - 1).max() <= 0.5 * np.abs(s_jordan - 1).max()


def test_polar_express_lifts_small_singular_values():
    # An ill-conditioned input: after Frobenius normalization its singular
    # values spread over [1e-3, 0.4], inside the [1e-3, 1] Polar Express was
    # designed for, where Jordan's quintic leaves a tail.
    x = _with_singular_values(64, 96, np.logspace(-2.5, 0, 64), seed=2)
    s_jordan = _singular_values(muonjax.orthogonalize(x))
    s_polar = _singular_values(muonjax.orthogonalize(x, ns_coeffs="polar_express"))
    assert s_jordan.min() < 0.6
    assert s_polar.min() > 0.85 and s_polar.max() < 1.15


def test_approaches_exact_polar_factor():
    x = _random((48, 64), seed=3)
    exact = _polar(x)
    err = lambda o: np.linalg.norm(np.asarray(o) - exact) / np.linalg.norm(exact)
    # The classical cubic Newton-Schulz converges to U V^T itself.
    cubic = muonjax.orthogonalize(x, ns_coeffs=(1.5, -0.5, 0.0), ns_steps=40)
    assert err(cubic) < 1e-4
    assert err(muonjax.orthogonalize(x, ns_coeffs="polar_express")) < 0.1
    assert err(muonjax.orthogonalize(x)) < 0.25


def test_transpose_commutes():
    x = _random((20, 50), seed=4)
    np.testing.assert_allclose(
        muonjax.orthogonalize(x.T), np.asarray(muonjax.orthogonalize(x)).T, atol=1e-6
    )


@pytest.mark.parametrize("shape", [(1, 40), (40, 1)])
def test_vectors_shaped_as_matrices(shape):
    x = _random(shape, seed=5)
    o = np.asarray(muonjax.orthogonalize(x))
    expected = newton_schulz(x, (JORDAN,) * 5)
    np.testing.assert_allclose(o, expected, atol=1e-5)
    # one singular value, the image of 1 under the quintic; direction kept
    cos = np.sum(o * x) / (np.linalg.norm(o) * np.linalg.norm(x))
    assert cos > 1 - 1e-6


def test_zero_input_gives_zero():
    o = muonjax.orthogonalize(jnp.zeros((8, 12)))
    assert np.all(np.asarray(o) == 0)


def test_bfloat16_compute_close_to_float32():
    x = _random((64, 96), seed=6)
    full = np.asarray(muonjax.orthogonalize(x))
    half = muonjax.orthogonalize(x, compute_dtype=jnp.bfloat16)
    assert half.dtype == jnp.float32  # returns the input's dtype
    # bfloat16 rounding moves the iterates (about 6% here) but not the
    # property Muon needs: singular values stay in Jordan's band.
    assert np.linalg.norm(np.asarray(half) - full) < 0.1 * np.linalg.norm(full)
    s = _singular_values(half)
    assert 0.6 <= s.min() and s.max() <= 1.25


def test_keeps_input_dtype_and_jits():
    x = jnp.asarray(_random((16, 24), seed=7), jnp.bfloat16)
    o = jax.jit(muonjax.orthogonalize)(x)
    assert o.dtype == jnp.bfloat16 and o.shape == x.shape


def test_user_table_sets_steps():
    x = _random((16, 24), seed=8)
    table = ((3.0, -3.2, 1.2), (2.0, -1.5, 0.5), (1.875, -1.25, 0.375))
    got = muonjax.orthogonalize(x, ns_coeffs=table, ns_steps=3)
    np.testing.assert_allclose(got, newton_schulz(x, table), atol=2e-5)
    assert np.asarray(table).shape == (3, 3)
    got2 = muonjax.orthogonalize(x, ns_coeffs=np.asarray(table), ns_steps=3)
    np.testing.assert_allclose(got, got2, atol=0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"ns_coeffs": "polar_express", "ns_steps": 3}, ValueError, "per-step table of 5 steps"),
        ({"ns_coeffs": ((1.5, -0.5, 0.0),) * 2, "ns_steps": 5}, ValueError, "ns_steps=2"),
        ({"ns_coeffs": "newton"}, ValueError, "jordan, polar_express"),
        ({"ns_coeffs": (1.0, 2.0)}, ValueError, r"\(a, b, c\)"),
        ({"ns_steps": 0}, ValueError, "at least 1"),
        ({"ns_steps": 5.0}, TypeError, "static Python int"),
    ],
)
def test_bad_coefficients_are_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        muonjax.orthogonalize(jnp.ones((4, 4)), **kwargs)


def test_vector_is_an_error():
    with pytest.raises(ValueError, match="ndim >= 2"):
        muonjax.orthogonalize(jnp.ones(4))


def test_flop_count():
    # 16 matrices 1024 x 704: short side 704, 5 steps of 4 m^2 n + 2 m^3
    m, n = 704, 1024
    assert muonjax.newton_schulz_flops((16, 1024, 704)) == 16 * 5 * (4 * m * m * n + 2 * m**3)
    # long side > 1.5 x short side: the Gram form, 4 m^2 n + 34 m^3 for 5 steps
    assert muonjax.newton_schulz_flops((4096, 1024)) == 4 * 1024**2 * 4096 + 34 * 1024**3
    # bfloat16 never takes the Gram form
    plain = 5 * (4 * 1024**2 * 4096 + 2 * 1024**3)
    assert muonjax.newton_schulz_flops((4096, 1024), compute_dtype="bfloat16") == plain


def _low_rank_plus_noise(shape, seed=0):
    """What a momentum looks like: rank 4 plus 10% noise."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((shape[0], 4)) @ rng.standard_normal((4, shape[1])) + 0.1 * (
        rng.standard_normal(shape)
    )


# Relative Frobenius error of one bfloat16 call against the float64 reference
# (seed 0). With the coefficients and scalar products rounded to bfloat16
# these were, per shape: jordan 0.054 / 0.066 / 0.062 / 0.060 / 0.049,
# polar_express 0.082 / 0.150 / 0.158 / 0.099 / 0.196; kept in float32,
# jordan 0.020 / 0.029 / 0.030 / 0.022 / 0.027 and polar_express 0.018 /
# 0.112 / 0.118 / 0.020 / 0.121, the Gram form (the tall, wide and 4-d shapes)
# the least accurate; without the Gram form in bfloat16, jordan 0.020 / 0.030
# / 0.026 / 0.022 / 0.019, polar_express 0.018 / 0.020 / 0.021 / 0.020 / 0.044.
# On low-rank-plus-noise inputs the Gram form in bfloat16 was 30-2900x off
# (singular values up to 14,000); now 0.039-0.046.
@pytest.mark.parametrize("name", ["jordan", "polar_express"])
@pytest.mark.parametrize(
    "shape, make",
    [
        ((64, 64), _random),
        ((96, 48), _random),
        ((48, 96), _random),
        ((4, 40, 56), _random),
        ((2, 3, 20, 12), _random),
        ((128, 512), _low_rank_plus_noise),
        ((512, 128), _low_rank_plus_noise),
        ((64, 256), _low_rank_plus_noise),
    ],
)
def test_bfloat16_compute_matches_float64_reference(name, shape, make):
    x = make(shape)
    table, safety = resolve_coefficients(name, 5)
    expected = newton_schulz(x, table, safety)
    got = np.asarray(
        muonjax.orthogonalize(jnp.asarray(x, jnp.float32), ns_coeffs=name, compute_dtype="bfloat16")
    )
    err = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    assert err < (0.042 if make is _random and name == "jordan" else 0.06)


def _equations(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _equations(sub)


@pytest.mark.parametrize("name", muonjax.optim.newton_schulz.NAMED_COEFFICIENTS)
@pytest.mark.parametrize("shape", [(16, 16), (16, 40)])  # standard and Gram form
def test_bfloat16_compute_keeps_coefficients_in_float32(name, shape):
    # A Python float times a bfloat16 array is a bfloat16 product: every
    # scalar product must instead be a float32 one, by the unrounded
    # coefficient (in float32).
    table, _ = resolve_coefficients(name, 5)
    closed = jax.make_jaxpr(
        lambda x: muonjax.orthogonalize(x, ns_coeffs=name, compute_dtype=jnp.bfloat16)
    )(jnp.ones(shape, jnp.float32))
    scalars = set()
    for eqn in _equations(closed.jaxpr):
        if eqn.primitive.name != "mul":
            continue
        assert eqn.outvars[0].aval.dtype == jnp.float32, eqn
        for v in eqn.invars:
            if isinstance(v, jax.extend.core.Literal):
                assert np.asarray(v.val).dtype == np.float32, eqn
                scalars.add(float(v.val))
    coefficients = {float(np.float32(c)) for row in table for c in row}
    assert coefficients <= scalars
