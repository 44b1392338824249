"""experiments/bench_distributed_muon.py --quick end to end (8 kernels (128, 128)
on 8 CPU devices): muonjax's Distributed Muon compiles under Auto and Explicit
axes without all-gathers, spreads Newton-Schulz evenly and equals the
unsharded update."""

from conftest import run_experiment


def test_quick_writes_results(tmp_path):
    results = run_experiment("bench_distributed_muon", tmp_path, "--quick")
    assert results["devices"] == 8 and results["jax"] and results["optax"]
    rows = {(r["library"], r["mode"]): r for r in results["rows"]}
    assert set(rows) == {
        (lib, mode) for lib in ("muonjax", "optax") for mode in ("Auto", "Explicit")
    }
    for mode in ("Auto", "Explicit"):
        row = rows["muonjax", mode]
        assert row["compiles"], row.get("error")
        assert row["all_gathers"] == 0 and row["all_gather_bytes"] == 0
        # two all-to-alls: 2/8 of one all-gather of the kernels
        assert row["bytes_per_device"] <= results["one_all_gather_bytes_per_device"]
        # 8 kernels over 8 devices: one whole matrix each, plus the elementwise update
        assert row["flops_over_ideal"] <= 1.15
        assert row["max_abs_diff_vs_unsharded"] < 1e-5
        assert row["update_spec"] == "P('d', None)"
        assert row["seconds"] > 0
    for row in rows.values():  # optax.contrib.muon: measured, or its error recorded
        assert row["compiles"] or row["error"]
