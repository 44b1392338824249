"""Write the tiny Hugging Face DeepseekV3 fixtures under tests/data/hf/.

    python tests/data/make_hf_fixture.py
    python tests/data/make_hf_fixture.py --check DIR   # DIR: e.g. `muonjax convert --to-hf`'s

--check loads DIR with transformers' DeepseekV3ForCausalLM, runs it on
DIR/tokens.npy and compares with DIR/logits.npy (max relative difference,
tolerance 1e-4); any missing, unexpected or mismatched tensor fails too. Exit
status 1 on failure.

Needs torch, transformers and safetensors (the test suite and CI do not: they
only read the files this writes, which are committed). Last run with
transformers 5.24.0, torch 2.14.1+cu130 (run on CPU), safetensors 0.8.0,
numpy 2.4.6.

Two float32 checkpoints, made with transformers' DeepseekV3Config /
DeepseekV3ForCausalLM and saved with save_pretrained:

* tests/data/hf/deepseek_v3_tiny/: Moonlight-16B-A3B's structure
  (q_lora_rank=None, sigmoid routing with e_score_correction_bias, one group,
  2 shared experts, first layer dense, rope_interleave) made tiny, split over
  several safetensors shards with a model.safetensors.index.json;
* tests/data/hf/deepseek_v3_tiny_qlora/: the same with q_lora_rank=24
  (q_a_proj, q_a_layernorm, q_b_proj), one shard.

transformers 5 holds the routed experts fused (experts.gate_up_proj,
experts.down_proj) but save_pretrained reverts that by default
(save_original_format=True), so the files have the released per-expert layout
(model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight); this script checks
that it did.

Every parameter is given non-trivial values: weights normal with std 0.1,
RMSNorm weights 1 + 0.1*randn, e_score_correction_bias 0.05*randn. Each folder
also gets tokens.npy (int64, (2, 12), fixed generator) and logits.npy (float32,
(2, 12, vocab)): the model's logits on those tokens (eval, no cache, eager
attention).
"""

from __future__ import annotations

import os
import re
import shutil
import sys

import numpy as np
import torch
import transformers
from safetensors import safe_open
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "hf")

SEED = 0
TOKENS_SHAPE = (2, 12)

BASE = dict(
    vocab_size=320,
    hidden_size=64,
    num_hidden_layers=3,
    first_k_dense_replace=1,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=32,
    q_lora_rank=None,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    n_routed_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    n_shared_experts=2,
    routed_scaling_factor=2.446,
    norm_topk_prob=True,
    n_group=1,
    topk_group=1,
    hidden_act="silu",
    rms_norm_eps=1e-5,
    rope_theta=50000.0,
    rope_scaling=None,
    rope_interleave=True,
    tie_word_embeddings=False,
    attention_bias=False,
    attention_dropout=0.0,
    max_position_embeddings=128,
    initializer_range=0.1,
    num_nextn_predict_layers=0,
    bos_token_id=0,
    eos_token_id=1,
)

FIXTURES = [
    ("deepseek_v3_tiny", {}, "300KB"),
    ("deepseek_v3_tiny_qlora", {"q_lora_rank": 24}, "50MB"),
]


def build(overrides: dict, seed: int) -> DeepseekV3ForCausalLM:
    torch.manual_seed(seed)
    config = DeepseekV3Config(**{**BASE, **overrides})
    config._attn_implementation = "eager"
    model = DeepseekV3ForCausalLM(config).to(torch.float32).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                # Default init already gives std initializer_range; redraw
                # everything from one generator so the values do not depend on
                # how transformers orders its own init.
                p.copy_(BASE["initializer_range"] * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=gen))
    return model


def routing_report(model, tokens) -> list[str]:
    """Top-k choices of each MoE gate, with and without the correction bias."""
    lines, captured = [], {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is None:
            continue

        def hook(mod, args, out, i=i):
            captured[i] = (args[0].detach().clone(), out[2].detach().clone())

        hooks.append(gate.register_forward_hook(hook))
    with torch.no_grad():
        model(input_ids=tokens, use_cache=False)
    for h in hooks:
        h.remove()
    for i, (hidden, idx) in sorted(captured.items()):
        gate = model.model.layers[i].mlp.gate
        scores = torch.sigmoid(hidden.view(-1, hidden.shape[-1]) @ gate.weight.T)
        nobias = scores.topk(gate.top_k, dim=-1).indices
        changed = sum(set(a.tolist()) != set(b.tolist()) for a, b in zip(idx, nobias))
        counts = torch.bincount(idx.flatten(), minlength=gate.num_experts).tolist()
        lines.append(
            f"layer {i}: expert use {counts}, tokens whose choice the bias changes: "
            f"{changed}/{idx.shape[0]}"
        )
        assert sum(c > 0 for c in counts) >= gate.num_experts // 2, counts
        assert changed > 0, "e_score_correction_bias changes no routing choice"
    return lines


def saved_keys(folder: str) -> dict[str, tuple]:
    keys = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(folder, f), "pt") as sf:
                for k in sf.keys():
                    keys[k] = (f, tuple(sf.get_slice(k).get_shape()), sf.get_slice(k).get_dtype())
    return keys


def check_saved(model, folder: str, keys: dict) -> None:
    """The files hold exactly the model's values, experts one per expert."""
    from safetensors.torch import load_file

    files = sorted({f for f, _, _ in keys.values()})
    saved = {}
    for f in files:
        saved.update(load_file(os.path.join(folder, f)))
    expected = {}
    inter = model.config.moe_intermediate_size
    for name, t in {**dict(model.named_parameters()), **dict(model.named_buffers())}.items():
        if name.endswith("rotary_emb.inv_freq") or name.endswith("rotary_emb.original_inv_freq"):
            continue
        m = re.fullmatch(r"(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)", name)
        if m is None:
            expected[name] = t
            continue
        for e in range(t.shape[0]):
            pre = f"{m.group(1)}.{e}"
            if m.group(2) == "gate_up_proj":  # forward: gate, up = (x @ W[e].T).chunk(2)
                expected[f"{pre}.gate_proj.weight"] = t[e, :inter]
                expected[f"{pre}.up_proj.weight"] = t[e, inter:]
            else:
                expected[f"{pre}.down_proj.weight"] = t[e]
    assert set(saved) == set(expected), set(saved) ^ set(expected)
    for k, t in expected.items():
        assert torch.equal(saved[k], t.detach()), k


def check(directory: str, tol: float = 1e-4) -> int:
    """transformers' logits of the checkpoint in `directory` against its logits.npy."""
    torch.set_num_threads(1)
    model, info = DeepseekV3ForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    model.eval()
    bad = {k: v for k, v in info.items() if v}
    print(f"transformers {transformers.__version__}; loading: {bad or 'clean'}")
    tokens = torch.from_numpy(np.load(os.path.join(directory, "tokens.npy")).astype(np.int64))
    want = np.load(os.path.join(directory, "logits.npy")).astype(np.float32)
    with torch.no_grad():
        got = model(input_ids=tokens, use_cache=False).logits.float().numpy()
    rel = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))
    print(f"{directory}: max relative difference {rel:.3e}")
    return 0 if rel <= tol and not bad else 1


def main() -> None:
    if sys.argv[1:2] == ["--check"]:
        return check(sys.argv[2])
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    torch.set_num_threads(1)
    for name, overrides, shard in FIXTURES:
        folder = os.path.join(OUT, name)
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        model = build(overrides, SEED)
        gen = torch.Generator().manual_seed(SEED + 2)
        tokens = torch.randint(
            0, BASE["vocab_size"], TOKENS_SHAPE, generator=gen, dtype=torch.int64
        )
        with torch.no_grad():
            logits = model(input_ids=tokens, use_cache=False).logits.float()
        print(f"== {name}: logits std {logits.std():.3f}, max |.| {logits.abs().max():.3f}")
        for line in routing_report(model, tokens):
            print("  " + line)
        model.save_pretrained(folder, max_shard_size=shard)
        np.save(os.path.join(folder, "tokens.npy"), tokens.numpy())
        np.save(os.path.join(folder, "logits.npy"), logits.numpy().astype(np.float32))

        keys = saved_keys(folder)
        check_saved(model, folder, keys)
        assert "model.layers.1.mlp.experts.0.gate_proj.weight" in keys, (
            "experts not saved per expert"
        )
        assert not any(k.endswith("gate_up_proj") for k in keys), "fused experts saved"
        assert "model.layers.1.mlp.gate.e_score_correction_bias" in keys
        assert all(dt == "F32" for _, _, dt in keys.values())
        files = sorted(os.listdir(folder))
        shards = [f for f in files if f.endswith(".safetensors")]
        if name == "deepseek_v3_tiny":
            assert len(shards) >= 3 and "model.safetensors.index.json" in files, files
        total = sum(os.path.getsize(os.path.join(folder, f)) for f in files)
        print(f"  files: {files}; {total} bytes")
        n_params = sum(int(np.prod(s)) for _, s, _ in keys.values())
        print(f"  {len(keys)} tensors, {n_params} values")
    return None


if __name__ == "__main__":
    sys.exit(main())
