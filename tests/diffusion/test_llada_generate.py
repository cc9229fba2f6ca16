"""LLaDA masked-diffusion decoding: token-for-token parity with the public ``generate.py``.

Oracle: ``$JAXQUANT_DATA/llada_tiny/generate.npz`` (the official ``generate()`` run on the tiny
checkpoint: one prompt, and a left-padded batch of two, with every step's model input). Modes the
oracle did not record (classifier-free guidance) are checked against a plain numpy loop written
from the same description, calling the model step by step; random modes are checked by their
invariants. Argument refusals need no data.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant import data as jdata
from jaxquant.diffusion import masked
from jaxquant.models import llada

DATA = jdata.data_dir()
LLADA_DIR = os.path.join(DATA, "llada_tiny") if DATA else None
needs_data = pytest.mark.skipif(
    LLADA_DIR is None or not os.path.isdir(LLADA_DIR),
    reason="set $JAXQUANT_DATA to the protocol data (with llada_tiny/)")


@pytest.fixture(scope="module")
def model():
    return llada.load_llada(LLADA_DIR)


@pytest.fixture(scope="module")
def ref():
    g = np.load(os.path.join(LLADA_DIR, "generate.npz"))
    assert str(g["remasking"]) == "low_confidence" and float(g["temperature"]) == 0.0
    assert float(g["cfg_scale"]) == 0.0
    return g


def _settings(ref) -> dict:
    return {"gen_length": int(ref["gen_length"]), "block_length": int(ref["block_length"]),
            "steps": int(ref["steps"]), "mask_id": int(ref["mask_id"])}


# -------------------------------------------------------------------- golden generations
@needs_data
def test_single_prompt_reproduces_reference(model, ref):
    out, steps = masked.generate(model.logits_fn, model.params, ref["prompt_ids"],
                                 return_steps=True, **_settings(ref))
    np.testing.assert_array_equal(np.asarray(out), ref["output_ids"])
    # every forward's input, step by step ([steps, B=1, L] vs the reference's [steps, L])
    np.testing.assert_array_equal(np.asarray(steps)[:, 0], ref["step_inputs"])


@needs_data
def test_left_padded_batch_reproduces_reference(model, ref):
    out, steps = masked.generate(model.logits_fn, model.params, ref["batch_prompt_ids"],
                                 attention_mask=ref["batch_prompt_attention_mask"],
                                 return_steps=True, **_settings(ref))
    np.testing.assert_array_equal(np.asarray(out), ref["batch_output_ids"])
    np.testing.assert_array_equal(np.asarray(steps), ref["batch_step_inputs"])
    # without the mask the padded row attends its pads and decodes differently
    unmasked = masked.generate(model.logits_fn, model.params, ref["batch_prompt_ids"],
                               **_settings(ref))
    assert not np.array_equal(np.asarray(unmasked)[1], ref["batch_output_ids"][1])


@needs_data
def test_model_generate_uses_config_mask_id(model, ref):
    s = _settings(ref)
    s.pop("mask_id")
    np.testing.assert_array_equal(np.asarray(model.generate(ref["prompt_ids"], **s)),
                                  ref["output_ids"])


@needs_data
def test_tiny_temperature_keeps_the_argmax_path(model, ref):
    """Gumbel noise scaled by 1e-3 (< the reference's smallest committed top-1/top-2 gap 0.10)
    leaves the deterministic path; a temperature of 2 leaves it, reproducibly per key."""
    s = _settings(ref)
    out = masked.generate(model.logits_fn, model.params, ref["prompt_ids"], temperature=1e-3,
                          key=jax.random.key(0), **s)
    np.testing.assert_array_equal(np.asarray(out), ref["output_ids"])
    hot = [np.asarray(masked.generate(model.logits_fn, model.params, ref["prompt_ids"],
                                      temperature=2.0, key=jax.random.key(k), **s))
           for k in (1, 1, 2)]
    np.testing.assert_array_equal(hot[0], hot[1])
    assert not np.array_equal(hot[0], hot[2])
    assert not np.array_equal(hot[0], ref["output_ids"])


def _reference_loop(model, prompt, attention_mask, *, gen_length, block_length, steps, mask_id,
                    cfg_scale):
    """generate.py's deterministic low-confidence loop, step by step in numpy (float64 softmax
    and a stable descending sort for the top-k), calling the model at each step."""
    b, p = prompt.shape
    x = np.full((b, p + gen_length), mask_id, np.int64)
    x[:, :p] = prompt
    am = None if attention_mask is None else np.concatenate(
        [attention_mask, np.ones((b, gen_length), attention_mask.dtype)], axis=1)
    prompt_index = x != mask_id
    n_blocks = gen_length // block_length
    per_block = steps // n_blocks
    for blk in range(n_blocks):
        lo, hi = p + blk * block_length, p + (blk + 1) * block_length
        count = (x[:, lo:hi] == mask_id).sum(1)
        n_tr = np.stack([count // per_block + (i < count % per_block)
                         for i in range(per_block)], 1)
        for i in range(per_block):
            mask_index = x == mask_id
            if cfg_scale > 0:
                un_x = np.where(prompt_index, mask_id, x)
                am2 = None if am is None else np.concatenate([am, am])
                both = np.asarray(model(np.concatenate([x, un_x]), attention_mask=am2),
                                  np.float64)
                cond, un = both[:b], both[b:]
                logits = un + (cfg_scale + 1) * (cond - un)
            else:
                logits = np.asarray(model(x, attention_mask=am), np.float64)
            x0 = logits.argmax(-1)
            e = np.exp(logits - logits.max(-1, keepdims=True))
            prob = e / e.sum(-1, keepdims=True)
            x0_p = np.take_along_axis(prob, x0[..., None], -1)[..., 0]
            x0_p[:, hi:] = -np.inf
            x0 = np.where(mask_index, x0, x)
            conf = np.where(mask_index, x0_p, -np.inf)
            for j in range(b):
                sel = np.argsort(-conf[j], kind="stable")[: n_tr[j, i]]
                x[j, sel] = x0[j, sel]
    return x


@needs_data
@pytest.mark.parametrize("batched", [False, True])
def test_classifier_free_guidance_matches_stepwise_loop(model, ref, batched):
    s = {**_settings(ref), "gen_length": 8, "block_length": 4, "steps": 4}
    prompt = ref["batch_prompt_ids"] if batched else ref["prompt_ids"]
    am = ref["batch_prompt_attention_mask"] if batched else None
    want = _reference_loop(model, prompt, am, cfg_scale=1.5, **s)
    got = masked.generate(model.logits_fn, model.params, prompt, attention_mask=am,
                          cfg_scale=1.5, **s)
    np.testing.assert_array_equal(np.asarray(got), want)
    # guidance changes the result (so this comparison can fail)
    plain = masked.generate(model.logits_fn, model.params, prompt, attention_mask=am, **s)
    assert not np.array_equal(np.asarray(plain), want)


# -------------------------------------------------------------------- invariants, no data
def _tiny():
    cfg = llada.LLaDAConfig(vocab_size=32, embedding_size=32, d_model=16, n_heads=2,
                            n_kv_heads=1, n_layers=1, mlp_hidden_size=32, mask_token_id=31)
    return llada.LLaDAModel(cfg, llada.init_params(cfg, jax.random.key(3)))


def test_random_remasking_commits_the_scheduled_count_inside_the_block():
    m = _tiny()
    prompt = np.array([[1, 2, 3], [4, 5, 6]])
    out, steps = m.generate(prompt, gen_length=12, block_length=4, steps=9,
                            remasking="random", key=jax.random.key(7), return_steps=True)
    out, steps = np.asarray(out), np.asarray(steps)
    assert out.shape == (2, 15) and steps.shape == (9, 2, 15)
    np.testing.assert_array_equal(out[:, :3], prompt)
    assert not (out == 31).any()
    seq = np.concatenate([steps, out[None]])  # the sequence before each step, then the result
    for t in range(9):
        blk, i = divmod(t, 3)
        hi = 3 + (blk + 1) * 4
        newly = (seq[t] == 31) & (seq[t + 1] != 31)
        assert (newly.sum(1) == (2 if i == 0 else 1)).all()  # 4 masks over 3 steps: 2, 1, 1
        assert not newly[:, hi:].any()  # nothing after the current block
        assert (seq[t + 1][seq[t] != 31] == seq[t][seq[t] != 31]).all()  # committed stay
    again = m.generate(prompt, gen_length=12, block_length=4, steps=9, remasking="random",
                       key=jax.random.key(7))
    np.testing.assert_array_equal(np.asarray(again), out)


def test_decode_is_traced_once_for_all_steps():
    """The whole decode is one jitted program: the model is traced once, not once per step,
    and a second prompt of the same shape reuses the compiled decode."""
    m = _tiny()

    class Counting:  # hashable by identity: a static argument of the jitted decode
        calls = 0

        def __call__(self, params, ids, attention_mask=None):
            Counting.calls += 1
            return m.logits_fn(params, ids, attention_mask)

    fn = Counting()
    kw = {"gen_length": 8, "block_length": 2, "steps": 8, "mask_id": 31}
    a = masked.generate(fn, m.params, np.array([[1, 2]]), **kw)
    first = Counting.calls
    assert 1 <= first <= 2
    b = masked.generate(fn, m.params, np.array([[5, 6]]), **kw)
    assert Counting.calls == first
    assert a.shape == b.shape == (1, 10)


def test_num_transfer_tokens_spreads_the_remainder_first():
    got = masked.num_transfer_tokens(jnp.asarray([8, 5, 0], jnp.int32), 3)
    np.testing.assert_array_equal(np.asarray(got), [[3, 3, 2], [2, 2, 1], [0, 0, 0]])


def test_block_length_must_divide_gen_length():
    m = _tiny()
    with pytest.raises(ValueError, match=r"block_length=5.*gen_length=16"):
        m.generate(np.array([[1, 2]]), gen_length=16, block_length=5, steps=16)


def test_steps_must_split_over_blocks():
    m = _tiny()
    with pytest.raises(ValueError, match=r"steps=6.*number of blocks"):
        m.generate(np.array([[1, 2]]), gen_length=16, block_length=4, steps=6)


def test_sampling_needs_a_key_and_a_known_remasking():
    m = _tiny()
    with pytest.raises(ValueError, match="key"):
        m.generate(np.array([[1, 2]]), gen_length=4, block_length=4, steps=4, temperature=1.0)
    with pytest.raises(ValueError, match="remasking"):
        m.generate(np.array([[1, 2]]), gen_length=4, block_length=4, steps=4, remasking="top_p")
