"""Block-diffusion decoding with a KV cache (:mod:`jaxquant.diffusion.block`) and Elastic-dLLM
context folding (``fold_window`` of :func:`jaxquant.diffusion.elastic.generate_compressed`).

Oracles: the uncached block-causal decode (a whole-sequence forward with an explicit mask built
here in numpy), an explicit numpy step loop over the whole-sequence forward, the attention
identity (new tokens over ``cache ++ self`` keys = the same tokens inside the full sequence), and
the unfolded compressed decode.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.diffusion import block, elastic, masked
from jaxquant.models import llada

MASK = 63
CFG = llada.LLaDAConfig(vocab_size=64, embedding_size=64, d_model=32, n_heads=4, n_kv_heads=2,
                        n_layers=2, mlp_hidden_size=64, mask_token_id=MASK,
                        max_sequence_length=40)
PROMPT = np.array([[5, 17, 40], [0, 22, 7]])
PROMPT_AM = np.array([[1, 1, 1], [0, 1, 1]])


@pytest.fixture(scope="module")
def tiny():
    return llada.LLaDAModel(CFG, llada.init_params(CFG, jax.random.key(0)))


def _np_block_mask(p, gen, bl, current, terminal):
    """(query, key) visibility by the definition: prompt block -1, gen block j, key block <=
    query block; the terminal is seen by the current block and itself and sees blocks <= it."""
    bid = [-1] * p + [j // bl for j in range(gen)]
    n = len(bid) + int(terminal)
    vis = np.zeros((n, n), bool)
    for q in range(n):
        for k in range(n):
            qt, kt = terminal and q == n - 1, terminal and k == n - 1
            if qt and kt:
                vis[q, k] = True
            elif kt:
                vis[q, k] = bid[q] == current
            elif qt:
                vis[q, k] = bid[k] <= current
            else:
                vis[q, k] = bid[k] <= bid[q]
    return vis


@pytest.mark.parametrize("terminal", [False, True])
def test_block_causal_mask_matches_its_definition(terminal):
    p, gen, bl = 3, 8, 4
    bid = block.block_ids(p, gen, bl, terminal)
    for cur in range(gen // bl):
        got = np.asarray(block.block_causal_mask(bid, jnp.int32(cur), terminal))
        np.testing.assert_array_equal(got, _np_block_mask(p, gen, bl, cur, terminal))


def test_cached_forward_equals_the_full_forward(tiny):
    """New tokens attending to ``cache ++ themselves`` = the same tokens inside the whole
    sequence, when the cache holds the prefix's keys computed by a prefix-only forward."""
    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(0, 60, (2, 12)))
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    # prefix 0..7 sees itself; tokens 8..11 see everything: a block-causal sequence of 2 blocks
    vis = np.ones((12, 12), bool)
    vis[:8, 8:] = False
    full = llada.forward(CFG, tiny.params, ids, None, pos, attn_mask=jnp.asarray(vis)[None])
    ck, cv = llada.model.empty_cache(CFG, 2, 10)
    _, kp, vp = llada.model.forward_cached(CFG, tiny.params, ids[:, :8], pos[:, :8], ck, cv,
                                           jnp.zeros((2, 10), bool))
    ck, cv = ck.at[:, :, :8].set(kp), cv.at[:, :, :8].set(vp)
    valid = jnp.arange(10)[None, :] < 8
    got, _, _ = llada.model.forward_cached(CFG, tiny.params, ids[:, 8:], pos[:, 8:], ck, cv,
                                           jnp.broadcast_to(valid, (2, 10)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(full[:, 8:]), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("terminal", [False, True])
@pytest.mark.parametrize("remasking,temperature", [("low_confidence", 0.0), ("random", 0.5)])
def test_cached_decoding_equals_uncached(tiny, terminal, remasking, temperature):
    kw = dict(gen_length=16, block_length=4, steps=8, remasking=remasking,
              temperature=temperature, terminal_mask=terminal, attention_mask=PROMPT_AM,
              key=jax.random.key(3))
    a = np.asarray(tiny.generate_block(PROMPT, use_cache=True, **kw))
    b = np.asarray(tiny.generate_block(PROMPT, use_cache=False, **kw))
    np.testing.assert_array_equal(a, b)
    assert (a[:, 3:3 + 16] != MASK).all()  # everything decoded
    if terminal:
        assert (a[:, -1] == MASK).all()  # the protected terminal never is


def test_uncached_block_decoding_equals_an_explicit_loop(tiny):
    """A numpy loop: per block, per step, the whole-sequence forward with the block-causal mask
    from its definition, the most confident masked tokens of the block committed."""
    p, gen, bl, steps = 3, 8, 4, 4
    spb = steps // (gen // bl)
    x = np.concatenate([PROMPT[:1], np.full((1, gen), MASK)], 1)
    for cur in range(gen // bl):
        s, e = p + cur * bl, p + (cur + 1) * bl
        n_mask = bl
        ks = [n_mask // spb + (i < n_mask % spb) for i in range(spb)]
        vis = _np_block_mask(p, gen, bl, cur, False)
        for k in ks:
            lg = np.asarray(llada.forward(CFG, tiny.params, jnp.asarray(x), None,
                                          attn_mask=jnp.asarray(vis)[None]))[0, s:e]
            prob = np.exp(lg - lg.max(-1, keepdims=True))
            prob /= prob.sum(-1, keepdims=True)
            x0 = lg.argmax(-1)
            conf = np.where(x[0, s:e] == MASK, prob[np.arange(bl), x0], -np.inf)
            for j in np.argsort(-conf, kind="stable")[:k]:
                x[0, s + j] = x0[j]
    got = np.asarray(tiny.generate_block(PROMPT[:1], gen_length=gen, block_length=bl,
                                         steps=steps))
    np.testing.assert_array_equal(got, x)


def test_later_blocks_do_not_change_earlier_ones(tiny):
    """Causal across blocks: the first blocks of a longer decode equal a shorter decode."""
    short = np.asarray(tiny.generate_block(PROMPT, gen_length=8, block_length=4, steps=4,
                                           attention_mask=PROMPT_AM))
    long = np.asarray(tiny.generate_block(PROMPT, gen_length=16, block_length=4, steps=8,
                                          attention_mask=PROMPT_AM))
    np.testing.assert_array_equal(long[:, :11], short)


def test_block_decode_refuses_bad_input(tiny):
    with pytest.raises(ValueError, match="block_length=5 must be positive and divide"):
        tiny.generate_block(PROMPT, gen_length=16, block_length=5, steps=8)
    with pytest.raises(ValueError, match="max_sequence_length 40"):
        tiny.generate_block(PROMPT, gen_length=40, block_length=4, steps=10)


# -------------------------------------------------------------------- context folding
@pytest.mark.parametrize("terminal", [False, True])
def test_folding_with_a_window_larger_than_the_sequence_equals_no_folding(tiny, terminal):
    kw = dict(gen_length=16, block_length=4, steps=8, keep_far=2, terminal_mask=terminal,
              attention_mask=PROMPT_AM)
    a = np.asarray(tiny.generate_compressed(PROMPT, **kw))
    b = np.asarray(tiny.generate_compressed(PROMPT, fold_window=40, **kw))
    np.testing.assert_array_equal(a, b)


def test_fold_keep_sets_drop_only_the_oldest_decoded_tokens():
    p, gen, bl, far, w = 3, 24, 4, 2, 13
    sets = elastic.keep_indices(p, gen, bl, far, terminal_mask=True, fold_window=w)
    full = elastic.keep_indices(p, gen, bl, far, terminal_mask=True)
    for b, (ks, fs) in enumerate(zip(sets, full, strict=True)):
        assert ks.size <= w
        start = p + b * bl
        dropped = sorted(set(fs.tolist()) - set(ks.tolist()))
        kept_decoded = [i for i in ks.tolist() if p <= i < start]
        # recomputed: every prompt token, the block, far, terminal; the newest decoded ones
        budget = w - (p + bl + min(far, p + gen - start - bl) + 1)
        assert kept_decoded == list(range(max(p, start - budget), start))
        assert all(p <= i < start for i in dropped)
        assert set(range(p)) <= set(ks.tolist())
        assert set(range(start, start + bl)) <= set(ks.tolist()) and p + gen in ks


def test_folding_decodes_past_the_maximum_length(tiny):
    """gen 48 + prompt 3 > max_sequence_length 40: refused without folding, decoded with a
    window of 16 tokens per forward (positions up to 51)."""
    kw = dict(gen_length=48, block_length=4, steps=24, keep_far=2, attention_mask=PROMPT_AM)
    with pytest.raises(ValueError, match=r"max_sequence_length 40.*fold_window"):
        tiny.generate_compressed(PROMPT, **kw)
    with pytest.raises(ValueError, match=r"max_sequence_length 40.*fold_window"):
        tiny.generate(PROMPT, gen_length=48, block_length=4, steps=24)
    out, stats = tiny.generate_compressed(PROMPT, fold_window=16, return_stats=True, **kw)
    assert (np.asarray(stats["tokens_per_step"]) <= 16).all()
    assert (np.asarray(out)[:, 3:] != MASK).all()
    with pytest.raises(ValueError, match="fold_window=6 is smaller"):
        tiny.generate_compressed(PROMPT, fold_window=6, **kw)


def test_masked_generate_respects_the_limit_only_when_given(tiny):
    masked.generate(tiny.logits_fn, tiny.params, PROMPT, gen_length=48, block_length=4,
                    steps=12, mask_id=MASK)  # no max_length: no check
