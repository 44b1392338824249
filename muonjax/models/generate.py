"""Text generation from token ids: prefill once, then one token per step
against a KV cache (or, for comparison, full recomputation), greedy or
temperature + nucleus (top-p) sampling."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from muonjax.models.config import ModelConfig
from muonjax.models.counts import param_counts
from muonjax.models.memory import GIB, PARAM_BYTES, TooLarge, devices_bytes
from muonjax.models.transformer import Transformer, init_cache

# The longest prompt + new tokens by default. muonjax's rotary model has no
# position limit, but the KV cache and the prefill's attention grow with the
# length (the latter with its square): a Hugging Face checkpoint's own
# max_position_embeddings replaces it (`muonjax generate`), as can max_len.
DEFAULT_MAX_LEN = 8192
# the seeds of generate and train (grain's shuffle takes [0, 2**32); jax.random.key any of those)
MAX_SEED = 2**32 - 1


def sample(logits_BV, key, temperature: float, top_p: float):
    """argmax at temperature 0, else a draw from softmax(logits / temperature)
    over the nucleus: the most likely tokens whose probability adds up to
    top_p (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration")."""
    if temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / temperature
    if top_p < 1:
        sorted_BV = jnp.flip(jnp.sort(logits_BV, axis=-1), axis=-1)
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        # a token stays while the mass before it is under top_p: the top one always does
        kept_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV < top_p
        floor_B1 = jnp.min(jnp.where(kept_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV >= floor_B1, logits_BV, -jnp.inf)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


# The graph definition and sampling settings are static: each generate call with
# the same model structure and settings reuses the compiled steps.
_STATIC = ("graphdef", "temperature", "top_p")


@functools.partial(jax.jit, static_argnames=(*_STATIC, "max_len"))
def _prefill(state, tokens_BP, start_B, key, *, graphdef, temperature, top_p, max_len):
    model = nnx.merge(graphdef, state)
    cache = init_cache(model.config, tokens_BP.shape[0], max_len, start_B)
    logits_BPV, cache = model.decode(tokens_BP, cache)
    return sample(logits_BPV[:, -1], key, temperature, top_p), cache


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("cache",))
def _decode(state, cache, tokens_B, key, *, graphdef, temperature, top_p):
    logits_B1V, cache = nnx.merge(graphdef, state).decode(tokens_B[:, None], cache)
    return sample(logits_B1V[:, 0], key, temperature, top_p), cache


@functools.partial(jax.jit, static_argnames=_STATIC)
def _recompute(state, tokens_BL, last_B, key, *, graphdef, temperature, top_p):
    # the training forward pass; rows are right-padded, which causality hides
    logits_BLV, _ = nnx.merge(graphdef, state)(tokens_BL)
    logits_BV = jnp.take_along_axis(logits_BLV, last_B[:, None, None], axis=1)[:, 0]
    return sample(logits_BV, key, temperature, top_p)


def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    use_cache: bool = True,
    eos_id: int | None = None,
    max_len: int = DEFAULT_MAX_LEN,
) -> list[list[int]]:
    """Continues each prompt (token ids) by up to max_new_tokens ids; a row
    stops after it emits eos_id (kept as its last id), the others go on.

    Greedy at temperature 0, else temperature + top-p sampling with keys from
    `seed` (step i draws with fold_in(key(seed), i)). With the cache (default),
    the prompts are left-padded into one batch and prefilled once, then each
    step feeds one token per row; every row gets what its prompt alone would.
    use_cache=False recomputes the whole sequence so far with the training
    forward pass at every step (the baseline the cache is measured against).

    Bounded before anything is compiled: the longest prompt + max_new_tokens
    must be at most `max_len`, and the KV cache and the prefill must fit in the
    memory of the devices the model is on (TooLarge, a ValueError, otherwise).
    """
    _check(model, prompts, max_new_tokens, temperature, top_p, seed, eos_id, max_len)
    graphdef, state = nnx.split(model)
    devices = list({d for leaf in jax.tree.leaves(state) for d in leaf.devices()})
    longest = max(map(len, prompts))
    check_generation_fits(model.config, devices, len(prompts), longest, max_new_tokens)
    static = dict(graphdef=graphdef, temperature=float(temperature), top_p=float(top_p))
    decoder = (_CachedDecoder if use_cache else _RecomputingDecoder)(
        state, prompts, max_new_tokens, static
    )
    key = jax.random.key(seed)
    out: list[list[int]] = [[] for _ in prompts]
    done_B = np.zeros(len(prompts), bool)
    for i in range(max_new_tokens):
        host_B = decoder.step(i, jax.random.fold_in(key, i))
        for b in np.flatnonzero(~done_B):
            out[b].append(int(host_B[b]))
            done_B[b] = host_B[b] == eos_id
            decoder.feed(b, host_B[b])
        if done_B.all():
            break
    return out


class _CachedDecoder:
    """generate's steps with the KV cache: the prompts left-padded into one
    batch and prefilled at step 0, then one token per row fed at each step."""

    def __init__(self, state, prompts, max_new_tokens: int, static: dict):
        lengths = np.array([len(p) for p in prompts])
        B, P = len(prompts), int(lengths.max())
        self.tokens_BP = np.zeros((B, P), np.int32)
        for b, p in enumerate(prompts):
            self.tokens_BP[b, P - len(p) :] = p
        self.start_B = jnp.asarray(P - lengths, jnp.int32)
        self.max_len = P + max_new_tokens - 1  # the last new token is never fed back
        self.state, self.static = state, static
        self.next_B = self.cache = None

    def step(self, i: int, key) -> np.ndarray:
        """Step `i`'s token of every row, on the host."""
        if i == 0:
            self.next_B, self.cache = _prefill(
                self.state, self.tokens_BP, self.start_B, key, **self.static, max_len=self.max_len
            )
        else:
            self.next_B, self.cache = _decode(
                self.state, self.cache, self.next_B, key, **self.static
            )
        return np.asarray(self.next_B)

    def feed(self, b: int, token) -> None:
        """Nothing: the next step feeds every row's token from the device."""


class _RecomputingDecoder:
    """generate's steps without a cache: the whole sequence so far (rows
    right-padded) through the training forward pass at every step."""

    def __init__(self, state, prompts, max_new_tokens: int, static: dict):
        lengths = np.array([len(p) for p in prompts])
        self.tokens_BS = np.zeros((len(prompts), int(lengths.max()) + max_new_tokens), np.int32)
        for b, p in enumerate(prompts):
            self.tokens_BS[b, : len(p)] = p
        self.lengths_B = lengths.copy()
        self.state, self.static = state, static

    def step(self, i: int, key) -> np.ndarray:
        """Step `i`'s token of every row, on the host."""
        so_far = int(self.lengths_B.max())
        last_B = jnp.asarray(self.lengths_B - 1, jnp.int32)
        tokens_BL = self.tokens_BS[:, :so_far]
        return np.asarray(_recompute(self.state, tokens_BL, last_B, key, **self.static))

    def feed(self, b: int, token) -> None:
        """Row `b`'s new token, appended to its sequence (a row still going)."""
        self.tokens_BS[b, self.lengths_B[b]] = token
        self.lengths_B[b] += 1


def _check(model, prompts, max_new_tokens, temperature, top_p, seed, eos_id, max_len) -> None:
    """Raises one ValueError naming every bad argument and what would be valid."""
    vocab = model.config.vocab_size
    errors = []
    if not prompts:
        errors.append("prompts is empty (valid: one or more sequences of token ids)")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            errors.append(f"prompts[{i}] is empty (valid: at least one token id)")
        elif min(p) < 0 or max(p) >= vocab:
            errors.append(f"prompts[{i}] has ids outside 0..{vocab - 1}")
    errors += sampling_errors(max_new_tokens, temperature, top_p, seed)
    if eos_id is not None and not 0 <= eos_id < vocab:
        errors.append(f"eos_id={eos_id} (valid: None or 0..{vocab - 1})")
    if not errors:
        errors += length_errors([len(p) for p in prompts], max_new_tokens, max_len)
    if errors:
        raise ValueError("Cannot generate: " + "; ".join(errors) + ".")


def _argument(name: str) -> str:
    return f"{name}="


def sampling_errors(max_new_tokens, temperature, top_p, seed, spell=_argument) -> list[str]:
    """What is wrong with these settings, one phrase each naming the value and what
    is valid; `spell(name)` is how a value is introduced (the CLI's: its flag)."""
    errors = []
    if not (isinstance(max_new_tokens, (int, np.integer)) and max_new_tokens >= 1):
        errors.append(f"{spell('max_new_tokens')}{max_new_tokens} (valid: 1 or more)")
    if not (math.isfinite(temperature) and temperature >= 0):
        errors.append(f"{spell('temperature')}{temperature} (valid: 0 for greedy, or positive)")
    if not 0 < top_p <= 1:  # NaN too: no comparison with it holds
        errors.append(f"{spell('top_p')}{top_p} (valid: more than 0, at most 1)")
    if not (isinstance(seed, (int, np.integer)) and 0 <= seed <= MAX_SEED):
        errors.append(f"{spell('seed')}{seed} (valid: 0 to {MAX_SEED})")
    return errors


def length_errors(lengths, max_new_tokens: int, max_len: int, spell=_argument) -> list[str]:
    """The longest prompt + max_new_tokens against max_len, in words (none if it fits)."""
    if max_len < 1:
        return [f"{spell('max_len')}{max_len} (valid: 1 or more)"]
    longest = max(lengths, default=0)
    if longest + max_new_tokens <= max_len:
        return []
    return [
        f"the longest prompt ({longest:,} token{'s' if longest != 1 else ''}) + "
        f"{spell('max_new_tokens')}{max_new_tokens} "
        f"= {longest + max_new_tokens:,} tokens, more than the maximum length "
        f"{spell('max_len')}{max_len}"
    ]


def generation_bytes(config: ModelConfig, batch: int, prompt_len: int, max_new_tokens: int) -> int:
    """What generating holds beyond the parameters, from shapes alone (a lower
    bound): the KV cache (init_cache's arrays) and the prefill's largest arrays,
    one layer's attention logits and probabilities (float32, batch x heads x
    prompt x cache slots) and the logits of every prompt position (float32)."""
    slots = prompt_len + max_new_tokens - 1
    cache = jax.eval_shape(lambda: init_cache(config, batch, slots))
    cache_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache))
    attention = 2 * batch * config.n_heads * prompt_len * slots * 4
    logits = batch * prompt_len * config.vocab_size * 4
    return cache_bytes + attention + logits


def check_generation_fits(
    config: ModelConfig,
    devices,
    batch: int,
    prompt_len: int,
    max_new_tokens: int,
    *,
    with_params: bool = False,
) -> None:
    """TooLarge unless generating fits in `devices`' memory: the KV cache and the
    prefill (generation_bytes), and with `with_params` the parameters too (a
    check before the model is loaded)."""
    need = generation_bytes(config, batch, prompt_len, max_new_tokens)
    if with_params:
        need += param_counts(config)["total"] * PARAM_BYTES
    have = devices_bytes(devices)
    if need > have:
        what = " and the parameters" if with_params else ""
        raise TooLarge(
            f"generating {batch} x ({prompt_len:,} prompt + {max_new_tokens:,} new) tokens needs "
            f"at least {need / GIB:,.1f} GiB (the KV cache and the prefill's attention{what}), "
            f"more than the {have / GIB:,.1f} GiB the devices can hold: lower the number of new "
            "tokens, the prompts' length or their number"
        )
