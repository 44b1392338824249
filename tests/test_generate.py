"""Generation with a KV cache: prefill and decode logits against the training
forward pass (MLA's absorbed projections included), greedy generation against
a recomputation loop, left-padded batches against each prompt alone, the
cache's size, sampling and stopping."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from muonjax.models import Transformer, generate, preset
from muonjax.models.attention import MHACache, MLACache
from muonjax.models.generate import sample
from muonjax.models.transformer import init_cache

VOCAB = 64
# tiny: one dense and one MoE layer. At its init_std of 0.02 attention barely
# moves the argmax (greedy tokens survived a broken W_UK); at 0.2 context counts.
TINY = preset("tiny").replace(vocab_size=VOCAB, init_std=0.2)
CONFIGS = {
    "mla": TINY,
    "mla-q-lora": TINY.replace(q_lora_rank=24),
    "mha": TINY.replace(attention="mha", head_dim=16),
}
# Lengths differ; they and NEW are small and overlap, so that the reference
# loop compiles few distinct shapes.
PROMPTS = [[5, 17, 3, 40, 9, 22], [33, 2, 60], [11, 11, 50, 7, 19]]
NEW = 4


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request):
    return Transformer(CONFIGS[request.param], rngs=nnx.Rngs(3))


def _forward(model):
    """The training forward pass, jitted: tokens (B, L) -> logits (B, L, V)."""
    graphdef, state = nnx.split(model)
    return lambda tokens: _jit_forward(graphdef, state, jnp.asarray(tokens, jnp.int32))


@functools.partial(jax.jit, static_argnames="graphdef")
def _jit_forward(graphdef, state, tokens_BL):
    return nnx.merge(graphdef, state)(tokens_BL)[0]


@functools.partial(jax.jit, static_argnames="graphdef")
def _jit_decode(graphdef, state, tokens_BC, cache):
    return nnx.merge(graphdef, state).decode(tokens_BC, cache)


def _decode(model, tokens_BC, cache):
    graphdef, state = nnx.split(model)
    return _jit_decode(graphdef, state, jnp.asarray(tokens_BC, jnp.int32), cache)


def greedy_by_recomputation(model, prompt, steps):
    """The reference, independent of the cache code: the prompt alone through
    the training forward pass, argmax of the last position, appended, again."""
    forward, tokens = _forward(model), list(prompt)
    for _ in range(steps):
        tokens.append(int(jnp.argmax(forward(np.array([tokens]))[0, -1])))
    return tokens[len(prompt) :]


@pytest.mark.slow
def test_greedy_with_cache_equals_recomputation_per_prompt(model):
    batched = generate(model, PROMPTS, max_new_tokens=NEW)
    for prompt, row in zip(PROMPTS, batched):
        assert row == greedy_by_recomputation(model, prompt, NEW)


@pytest.mark.slow
def test_batch_rows_equal_each_prompt_alone():
    # the padding logic is the model's, not the attention kind's: MLA alone
    model = Transformer(CONFIGS["mla"], rngs=nnx.Rngs(3))
    batched = generate(model, PROMPTS, max_new_tokens=NEW)
    assert [generate(model, [p], max_new_tokens=NEW)[0] for p in PROMPTS] == batched
    # use_cache=False (right-padded rows, the training forward pass) gives the
    # same; two steps (a compile each) cover both the prompt and a generated token
    recomputed = generate(model, PROMPTS, max_new_tokens=2, use_cache=False)
    assert recomputed == [row[:2] for row in batched]


def test_prefill_and_decode_logits_equal_forward(model):
    """The cached path's logits, left padding included, against model(tokens)
    of each row alone: checks MLA's absorbed math directly."""
    forward = _forward(model)
    rows = [[3, 14, 15, 9, 26, 5, 35], [8, 9, 7, 9]]  # row 1 left-padded by 3
    P = len(rows[0])
    padded = np.array([rows[0], [0] * (P - len(rows[1])) + rows[1]])
    cache = init_cache(model.config, 2, P + 1, jnp.array([0, P - len(rows[1])]))
    prefill, cache = _decode(model, padded, cache)
    decoded, cache = _decode(model, np.array([[42], [1]]), cache)
    assert int(cache.length) == P + 1
    for b, (row, new) in enumerate(zip(rows, (42, 1))):
        want = forward(np.array([row + [new]]))[0]
        got = np.concatenate([prefill[b, P - len(row) :], decoded[b]])
        # float32 rounding is relative to the logits' scale, not to each (maybe near 0) entry
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_cache_holds_latent_and_rotary_key_only():
    c = CONFIGS["mla"].replace(n_layers=3, first_k_dense=1)
    cache = init_cache(c, batch=2, max_len=10)
    assert isinstance(cache.moe, MLACache)
    # per layer and slot: kv_lora_rank + qk_rope_head_dim values, not per-head keys and values
    assert cache.dense.latent_BSR.shape == (1, 2, 10, c.kv_lora_rank)
    assert cache.moe.latent_BSR.shape == (2, 2, 10, c.kv_lora_rank)
    assert cache.moe.k_rope_BSK.shape == (2, 2, 10, c.qk_rope_head_dim)
    per_slot = sum(a.shape[-1] for a in cache.moe)
    assert per_slot == 32 + 8 < 2 * c.n_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim)
    mha = init_cache(CONFIGS["mha"], batch=2, max_len=10)
    assert isinstance(mha.moe, MHACache)
    assert mha.moe.k_BSHK.shape == mha.moe.v_BSHK.shape == (1, 2, 10, 4, 16)  # 2 * H * K
    assert init_cache(c.replace(first_k_dense=3), 1, 4).moe is None


@pytest.mark.slow
def test_sampling_seed_top_p_and_eos():
    model = Transformer(CONFIGS["mla"], rngs=nnx.Rngs(3))
    draw = lambda **kw: generate(model, PROMPTS, max_new_tokens=NEW, temperature=1.0, **kw)
    assert draw(seed=1) == draw(seed=1)
    assert draw(seed=1) != draw(seed=2)
    greedy = generate(model, PROMPTS, max_new_tokens=NEW)
    assert draw(seed=1, top_p=1e-6) == greedy  # the nucleus is the top token alone
    # a row stops after its first eos (kept); the others run on
    eos = greedy[0][1]
    stopped = generate(model, PROMPTS, max_new_tokens=NEW, eos_id=eos)
    for row, full in zip(stopped, greedy):
        assert row == (full[: full.index(eos) + 1] if eos in full else full)
    assert len(stopped[0]) == greedy[0].index(eos) + 1 < NEW
    assert max(map(len, stopped)) <= NEW


def test_sample_keeps_the_nucleus():
    logits_BV = jnp.log(jnp.tile(jnp.array([0.5, 0.3, 0.15, 0.05]), (1000, 1)))
    draws = lambda top_p, t=1.0: set(np.asarray(sample(logits_BV, jax.random.key(0), t, top_p)))
    assert draws(0.6) == {0, 1}  # 0.5 < 0.6: the second token is needed, the third not
    assert draws(1.0) == {0, 1, 2, 3}
    assert draws(1.0, t=0.0) == {0}


def test_bad_arguments_name_what_is_valid():
    model = Transformer(CONFIGS["mla"], rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty.*top_p=0"):
        generate(model, [[1], []], max_new_tokens=2, top_p=0)
    with pytest.raises(ValueError, match=r"ids outside 0\.\.63.*max_new_tokens=0"):
        generate(model, [[1, 64]], max_new_tokens=0)
