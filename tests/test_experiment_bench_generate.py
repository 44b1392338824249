"""experiments/bench_generate.py --quick end to end: tokens/s with and without
the KV cache on `tiny`, and the cache bytes per token per layer from the
shapes the model allocates (MLA: latent + rotary key; Moonlight's without its
parameters)."""

import math

import pytest
from conftest import run_experiment

# trains, starts processes or runs an experiment: left out of make test-fast
pytestmark = pytest.mark.slow


def test_quick_writes_results(tmp_path):
    results = run_experiment("bench_generate", tmp_path, "--quick")
    t = results["throughput"]
    assert results["quick"] and t["preset"] == "tiny" and t["config"]["vocab_size"] == 256
    for mode in ("cached", "recomputed"):
        r = t[mode]
        assert r["tokens_per_s"] > 0 and r["seconds"] > 0 and r["compile_s"] >= 0, mode
        assert len(r["seconds_all"]) == t["repeats"]
        assert math.isclose(r["tokens_per_s"], t["batch"] * t["new_tokens"] / r["seconds"])
    assert t["speedup"] > 0 and isinstance(t["same_tokens"], bool)
    small, moon = results["cache_bytes"]["small"], results["cache_bytes"]["moonlight-16b-a3b"]
    # small: kv_lora_rank 128 + rope 16 float32 values against 8 heads x (48 + 32)
    assert small["mla_values_per_token_layer"] == 144 and small["mla_bytes_per_token_layer"] == 576
    assert small["mha_values_per_token_layer"] == 640
    # Moonlight: 512 + 64 against 16 x (192 + 128), bfloat16
    assert moon["mla_values_per_token_layer"] == 576 and moon["mla_bytes_per_token_layer"] == 1152
    assert moon["mha_head_dims"] == {"keys": 192, "values": 128}
    assert moon["mha_bytes_per_token_layer"] == 10240
    assert moon["cache_shapes"]["moe.latent_BSR"] == [26, 1, 4096, 512]
    assert moon["mla_model_bytes"] == 27 * 4096 * 1152 and moon["context"] == 4096
    assert moon["mha_model_bytes"] == 27 * 4096 * 10240
