"""Hyperparameters checked where muon / moonlight / scale_by_muon are built: one
line naming the argument, not an error from NumPy at the first update; arrays
(as optax.inject_hyperparams passes them) left alone; the Flax helper without
flax."""

import sys

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import muonjax


@pytest.mark.parametrize("build", [muonjax.muon, muonjax.moonlight])
@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"momentum": 1.5}, ValueError, r"momentum must be finite and in \[0, 1\), got 1.5"),
        ({"momentum": 1.0}, ValueError, r"momentum must be finite and in \[0, 1\)"),
        ({"weight_decay": -1}, ValueError, r"weight_decay must be finite and in \[0, inf\]"),
        ({"weight_decay": float("nan")}, ValueError, "weight_decay must be finite"),
        ({"rms_scale": float("inf")}, ValueError, "rms_scale must be finite"),
        ({"eps": -1e-7}, ValueError, "eps must be"),
        ({"learning_rate": "1e-2"}, TypeError, "learning_rate must be a number or an optax"),
        ({"learning_rate": -0.1}, ValueError, "learning_rate must be finite and in"),
        ({"momentum": "0.9"}, TypeError, "momentum must be a number, got '0.9'"),
        ({"momentum": True}, TypeError, "momentum must be a number"),
    ],
)
def test_a_bad_hyperparameter_is_one_clear_error(build, changes, error, message):
    with pytest.raises(error, match=message) as raised:
        build(**{"learning_rate": 0.1, **changes})
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"adam_b1": 1.0}, r"adam_b1 must be finite and in \[0, 1\)"),
        ({"adam_b2": -0.1}, "adam_b2 must be"),
        ({"adam_eps": -1.0}, "adam_eps must be"),
        ({"adamw_weight_decay": -0.1}, "adamw_weight_decay must be"),
    ],
)
def test_moonlights_adamw_group_is_checked_too(changes, message):
    with pytest.raises(ValueError, match=message):
        muonjax.moonlight(0.1, **changes)


def test_good_values_numbers_of_any_kind_schedules_and_arrays_pass():
    params = {"w": jnp.ones((4, 4))}
    for lr in (0, 1e-2, np.float32(1e-2), optax.cosine_decay_schedule(1e-2, 10)):
        muonjax.muon(lr, momentum=0.0, weight_decay=0).init(params)
    muonjax.muon(jnp.asarray(1e-2), momentum=jnp.asarray(1.5)).init(params)  # arrays: unchecked
    tx = optax.inject_hyperparams(muonjax.moonlight)(learning_rate=0.1, momentum=0.9)
    tx.update(params, tx.init(params), params)


def test_matrix_axes_must_return_matrix_axes():
    with pytest.raises(
        TypeError, match=r"matrix_axes must return MatrixAxes or None, got \(0, 1\)"
    ):
        muonjax.muon(0.1, matrix_axes=lambda path, leaf: (0, 1)).init({"w": jnp.ones((4, 4))})


def test_nnx_helper_without_flax_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "flax", None)  # import flax fails as if absent
    monkeypatch.delitem(sys.modules, "muonjax.nnx_axes", raising=False)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'muonjax\[train\]'"):
        muonjax.nnx_matrix_axes  # noqa: B018
    assert "nnx_matrix_axes" in dir(muonjax) and "moonlight" in dir(muonjax)
