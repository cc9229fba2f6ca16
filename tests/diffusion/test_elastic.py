"""Elastic-dLLM [MASK] compression and the protected terminal [MASK]
(:mod:`jaxquant.diffusion.elastic`).

Oracles: the baseline decode :func:`jaxquant.diffusion.masked.generate` (keep-all compression
must equal it bit for bit), explicit recomputations written here (the kept set from
``numpy.array_split``, the model's own :func:`jaxquant.models.llada.forward` run on just the kept
tokens with their original position ids, a numpy step loop), and, with ``$JAXQUANT_DATA``, the
golden LLaDA generations of ``llada_tiny/generate.npz``. What the compressed forward really sees
is recorded at every step by a ``jax.debug.callback`` inside the mask predictor.
"""

import os

import jax
import numpy as np
import pytest

from jaxquant import data as jdata
from jaxquant.diffusion import elastic, masked
from jaxquant.models import llada

DATA = jdata.data_dir()
LLADA_DIR = os.path.join(DATA, "llada_tiny") if DATA else None
needs_data = pytest.mark.skipif(
    LLADA_DIR is None or not os.path.isdir(LLADA_DIR),
    reason="set $JAXQUANT_DATA to the protocol data (with llada_tiny/)")

MASK = 63
CFG = llada.LLaDAConfig(vocab_size=64, embedding_size=64, d_model=32, n_heads=4, n_kv_heads=2,
                        n_layers=2, mlp_hidden_size=64, mask_token_id=MASK)
PROMPT = np.array([[5, 17, 40]])
BATCH = np.array([[5, 17, 40, 9], [0, 0, 22, 7]])
BATCH_AM = np.array([[1, 1, 1, 1], [0, 0, 1, 1]])


@pytest.fixture(scope="module")
def tiny():
    return llada.LLaDAModel(CFG, llada.init_params(CFG, jax.random.key(0)))


class Recorder:
    """A mask predictor (``LLaDA forward``) that records, at every call the decode makes, the
    ids, attention mask, positions and logits it saw. Hashable by identity: a fresh instance is
    a fresh static argument, so the decode is traced anew and every step reports."""

    def __init__(self, model):
        self.model = model
        self.calls = []

    def _record(self, ids, am, positions, logits):
        self.calls.append((np.asarray(ids), None if am is None else np.asarray(am),
                           np.asarray(positions), np.asarray(logits)))

    def __call__(self, params, ids, attention_mask=None, positions=None):
        logits = llada.forward(self.model.config, params, ids, attention_mask, positions)
        if attention_mask is None:
            jax.debug.callback(lambda i, p, lg: self._record(i, None, p, lg), ids, positions,
                               logits, ordered=True)
        else:
            jax.debug.callback(self._record, ids, attention_mask, positions, logits,
                               ordered=True)
        return logits


def explicit_keep(p, gen_length, block_length, keep_far, blk, terminal):
    """The kept positions while block ``blk`` is decoded, written out directly: everything up
    to the block's end, the last position of each of ``keep_far`` array_split segments of the
    far region, and the terminal."""
    end = p + (blk + 1) * block_length
    far = np.arange(end, p + gen_length)
    k = len(far) if keep_far is None else min(keep_far, len(far))
    kept_far = [s[-1] for s in np.array_split(far, k)] if k else []
    return np.array(list(range(end)) + kept_far + ([p + gen_length] if terminal else []))


# -------------------------------------------------------------------- keep-all == baseline
CASES = {
    "single": {"prompt_ids": PROMPT},
    "padded_batch": {"prompt_ids": BATCH, "attention_mask": BATCH_AM},
    "cfg": {"prompt_ids": BATCH, "attention_mask": BATCH_AM, "cfg_scale": 1.5},
    "sampled_random": {"prompt_ids": BATCH, "attention_mask": BATCH_AM, "temperature": 1.0,
                       "remasking": "random", "key": jax.random.key(5)},
}


@pytest.mark.parametrize("case", list(CASES))
def test_keep_all_is_bit_identical_to_generate(tiny, case):
    kw = {"gen_length": 16, "block_length": 4, "steps": 8, "mask_id": MASK, **CASES[case]}
    want, want_steps = masked.generate(tiny.logits_fn, tiny.params, return_steps=True, **kw)
    want, want_steps = np.asarray(want), np.asarray(want_steps)
    p = kw["prompt_ids"].shape[1]
    all_sets = [np.arange(p + 16)] * 4
    for keep in ({"keep_far": None}, {"keep_far": 12}, {"keep_far": 1000},
                 {"keep_sets": all_sets}):
        got, steps, stats = elastic.generate_compressed(
            tiny.logits_fn, tiny.params, return_steps=True, return_stats=True, **keep, **kw)
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=str(keep))
        np.testing.assert_array_equal(np.asarray(steps), want_steps, err_msg=str(keep))
        assert (stats["tokens_per_step"] == p + 16).all()
    # compression does change this decode (so the comparison above can fail)
    small = elastic.generate_compressed(tiny.logits_fn, tiny.params, keep_far=1,
                                        return_steps=True, **kw)[1]
    assert not np.array_equal(np.asarray(small), want_steps)


@needs_data
def test_keep_all_reproduces_the_golden_generations():
    model = llada.load_llada(LLADA_DIR)
    ref = np.load(os.path.join(LLADA_DIR, "generate.npz"))
    s = {"gen_length": int(ref["gen_length"]), "block_length": int(ref["block_length"]),
         "steps": int(ref["steps"])}
    out, steps = model.generate_compressed(ref["prompt_ids"], return_steps=True, **s)
    np.testing.assert_array_equal(np.asarray(out), ref["output_ids"])
    np.testing.assert_array_equal(np.asarray(steps)[:, 0], ref["step_inputs"])
    out = model.generate_compressed(ref["batch_prompt_ids"], keep_far=8,
                                    attention_mask=ref["batch_prompt_attention_mask"], **s)
    np.testing.assert_array_equal(np.asarray(out), ref["batch_output_ids"])


# -------------------------------------------------------------------- the protected terminal
@pytest.mark.parametrize("keep_far", [0, 2, None])
@pytest.mark.parametrize("sampled", [False, True])
def test_terminal_mask_is_never_unmasked(tiny, keep_far, sampled):
    extra = ({"temperature": 1.0, "remasking": "random", "key": jax.random.key(2)}
             if sampled else {})
    rec = Recorder(tiny)
    out, steps = elastic.generate_compressed(
        rec, tiny.params, BATCH, attention_mask=BATCH_AM, gen_length=16, block_length=4,
        steps=16, mask_id=MASK, keep_far=keep_far, terminal_mask=True, return_steps=True,
        **extra)
    out, steps = np.asarray(out), np.asarray(steps)
    p, length = BATCH.shape[1], BATCH.shape[1] + 16
    assert out.shape == (2, length + 1) and steps.shape == (16, 2, length + 1)
    assert (steps[:, :, length] == MASK).all()  # before every step
    assert (out[:, length] == MASK).all()  # and after the last
    np.testing.assert_array_equal(out[:, :p], BATCH)
    # one position committed per step, inside the current block (a sampled token may itself
    # be the [MASK] id, so with sampling a commit can leave a [MASK] behind)
    seq = np.concatenate([steps, out[None]])
    for t in range(16):
        newly = (seq[t] == MASK) & (seq[t + 1] != MASK)
        assert (newly.sum(1) <= 1).all() if sampled else (newly.sum(1) == 1).all()
        assert not newly[:, p + (t // 4 + 1) * 4:].any()
    if not sampled:
        assert not (out[:, p:length] == MASK).any()
    # the forward saw the terminal at every step: a [MASK] at position id P + gen_length
    assert len(rec.calls) == 16
    for ids, _, pos, _ in rec.calls:
        assert (pos[:, -1] == length).all() and (ids[:, -1] == MASK).all()


# -------------------------------------------------------------------- tokens per step
@pytest.mark.parametrize("terminal", [False, True])
@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_tokens_per_step_equal_the_kept_set(tiny, terminal, cfg_scale):
    """gen_length 64, block 8, keep_far 4: the forward's sequence length at every step (as
    recorded inside the decode) is P + decoded + block + min(4, far) (+1), far less than the
    full P + 64."""
    g, blk_len, steps, keep_far = 64, 8, 16, 4
    rec = Recorder(tiny)
    _, stats = elastic.generate_compressed(
        rec, tiny.params, PROMPT, gen_length=g, block_length=blk_len, steps=steps, mask_id=MASK,
        keep_far=keep_far, terminal_mask=terminal, cfg_scale=cfg_scale, return_stats=True)
    p = PROMPT.shape[1]
    want = []
    for t in range(steps):
        b = t // (steps // (g // blk_len))
        decoded, far = b * blk_len, g - (b + 1) * blk_len
        want.append(p + decoded + blk_len + min(keep_far, far) + int(terminal))
    seen = [ids.shape for ids, *_ in rec.calls]
    rows = 2 if cfg_scale else 1  # guidance: cond + uncond rows, same kept length
    assert seen == [(rows, n) for n in want]
    assert list(stats["tokens_per_step"]) == want
    assert stats["tokens_total"] == sum(want)
    full = p + g + int(terminal)
    assert stats["full_length"] == full and stats["tokens_full"] == full * steps
    # compression really reduces the work: 680 of 1072 tokens over the decode (without the
    # terminal), and 15 of 67 while the first block is decoded
    assert sum(want) < 0.65 * full * steps and want[0] < full / 4
    assert [len(k) for k in stats["kept"]] == want[:: steps // (g // blk_len)]


# -------------------------------------------------------------------- positions survive
@pytest.mark.parametrize("terminal", [False, True])
def test_positions_survive_compression(tiny, terminal):
    """At every step the compressed forward saw exactly the kept tokens of the current sequence
    with their original position ids, and its logits equal an independent forward over just
    those tokens at those positions (and differ from one with renumbered positions)."""
    g, blk_len, steps, keep_far = 16, 4, 8, 2
    rec = Recorder(tiny)
    _, seq = elastic.generate_compressed(
        rec, tiny.params, BATCH, attention_mask=BATCH_AM, gen_length=g, block_length=blk_len,
        steps=steps, mask_id=MASK, keep_far=keep_far, terminal_mask=terminal,
        return_steps=True)
    seq = np.asarray(seq)
    p = BATCH.shape[1]
    am_full = np.concatenate([BATCH_AM, np.ones((2, g + int(terminal)), int)], axis=1)
    assert len(rec.calls) == steps
    for t, (ids, am, pos, logits) in enumerate(rec.calls):
        keep = explicit_keep(p, g, blk_len, keep_far, t // 2, terminal)
        assert len(keep) < seq.shape[2] or t // 2 == 3  # the last block has no far masks
        np.testing.assert_array_equal(pos, np.broadcast_to(keep, pos.shape))
        np.testing.assert_array_equal(ids, seq[t][:, keep])
        np.testing.assert_array_equal(am, am_full[:, keep])
        want = llada.forward(CFG, tiny.params, seq[t][:, keep], am_full[:, keep],
                             np.broadcast_to(keep, (2, len(keep))).astype(np.int32))
        np.testing.assert_allclose(logits, np.asarray(want), atol=1e-5, rtol=0)
        if not np.array_equal(keep, np.arange(len(keep))):  # gapped: renumbering changes it
            renumbered = llada.forward(CFG, tiny.params, seq[t][:, keep], am_full[:, keep])
            assert np.max(np.abs(np.asarray(renumbered) - logits)) > 1e-2


def _compressed_loop(model, prompt, am, *, gen_length, block_length, steps, keep_far,
                     renumber=False):
    """Low-confidence decoding in numpy (float64 softmax, stable sort), running the model at
    each step on just the kept tokens at their original position ids (or renumbered 0..T-1)."""
    b, p = prompt.shape
    mask_id = model.config.mask_token_id
    x = np.full((b, p + gen_length), mask_id, np.int64)
    x[:, :p] = prompt
    am_full = np.concatenate([am, np.ones((b, gen_length), am.dtype)], axis=1)
    per_block = steps // (gen_length // block_length)
    for blk in range(gen_length // block_length):
        lo, hi = p + blk * block_length, p + (blk + 1) * block_length
        keep = explicit_keep(p, gen_length, block_length, keep_far, blk, False)
        count = (x[:, lo:hi] == mask_id).sum(1)
        n_tr = np.stack([count // per_block + (i < count % per_block)
                         for i in range(per_block)], 1)
        for i in range(per_block):
            pos = None if renumber else np.broadcast_to(keep, (b, len(keep)))
            lc = np.asarray(model(x[:, keep], attention_mask=am_full[:, keep], positions=pos),
                            np.float64)
            logits = np.full((b, x.shape[1], lc.shape[-1]), -np.inf)
            logits[:, keep] = lc
            x0 = logits.argmax(-1)
            e = np.exp(lc - lc.max(-1, keepdims=True))
            prob = np.full(x.shape, -np.inf)
            prob[:, keep] = np.take_along_axis(e / e.sum(-1, keepdims=True),
                                               x0[:, keep][..., None], -1)[..., 0]
            prob[:, hi:] = -np.inf
            mask_index = x == mask_id
            x0 = np.where(mask_index, x0, x)
            conf = np.where(mask_index, prob, -np.inf)
            for j in range(b):
                sel = np.argsort(-conf[j], kind="stable")[: n_tr[j, i]]
                x[j, sel] = x0[j, sel]
    return x


@needs_data
def test_compressed_decode_matches_an_explicit_loop_on_the_golden_model():
    model = llada.load_llada(LLADA_DIR)
    ref = np.load(os.path.join(LLADA_DIR, "generate.npz"))
    prompt, am = ref["batch_prompt_ids"], ref["batch_prompt_attention_mask"]
    s = {"gen_length": 32, "block_length": 4, "steps": 16, "keep_far": 2}
    want = _compressed_loop(model, prompt, am, **s)
    got = model.generate_compressed(prompt, attention_mask=am, **s)
    np.testing.assert_array_equal(np.asarray(got), want)
    # position ids matter for this decode, and so does compression
    assert not np.array_equal(_compressed_loop(model, prompt, am, renumber=True, **s), want)
    full = model.generate(prompt, attention_mask=am, gen_length=32, block_length=4, steps=16)
    assert not np.array_equal(np.asarray(full), want)


# -------------------------------------------------------------------- compile once per block
def test_model_traced_once_per_block(tiny):
    """Fixed shapes per block: one trace of the model per block (each block its own kept
    length), none per step, and a second prompt of the same shape reuses the program."""

    shapes = []

    def fn(params, ids, attention_mask=None, positions=None):  # hashable by identity
        shapes.append(ids.shape)
        return tiny.logits_fn(params, ids, attention_mask, positions)

    kw = {"gen_length": 16, "block_length": 4, "steps": 16, "mask_id": MASK, "keep_far": 1}
    a = elastic.generate_compressed(fn, tiny.params, np.array([[1, 2]]), **kw)
    assert shapes == [(1, 2 + 4 + 1), (1, 2 + 8 + 1), (1, 2 + 12 + 1), (1, 2 + 16)]
    b = elastic.generate_compressed(fn, tiny.params, np.array([[5, 6]]), **kw)
    assert len(shapes) == 4 and a.shape == b.shape == (1, 18)


# -------------------------------------------------------------------- refusals
def _call(tiny, **kw):
    base = {"gen_length": 16, "block_length": 4, "steps": 8}
    return tiny.generate_compressed(PROMPT, **{**base, **kw})


def test_keep_far_must_be_a_nonnegative_int(tiny):
    with pytest.raises(ValueError, match=r"keep_far=-1 must be >= 0"):
        _call(tiny, keep_far=-1)
    with pytest.raises(ValueError, match=r"keep_far=2\.5 must be an int"):
        _call(tiny, keep_far=2.5)
    with pytest.raises(ValueError, match=r"keep_far=0 drops the terminal"):
        _call(tiny, keep_far=0)
    _call(tiny, keep_far=0, terminal_mask=True)  # the terminal [MASK] marks the end instead


def test_keep_set_dropping_the_current_block_is_refused(tiny):
    p = PROMPT.shape[1]
    sets = [np.arange(p + 16)] * 4
    sets[1] = np.array([i for i in range(p + 16) if i != p + 5])  # position 5 of block 1
    with pytest.raises(ValueError, match=r"keep_sets\[1\] drops the current block .*\[8\]"):
        _call(tiny, keep_sets=sets)


def test_other_bad_keep_sets_are_refused(tiny):
    p, length = PROMPT.shape[1], PROMPT.shape[1] + 16
    full = np.arange(length)
    with pytest.raises(ValueError, match=r"keep_sets\[2\] drops prompt/decoded positions \[1\]"):
        _call(tiny, keep_sets=[full, full, np.delete(full, 1), full])
    with pytest.raises(ValueError, match=r"keep_sets\[0\] drops the terminal position 18"):
        _call(tiny, keep_sets=[full[:-1], full, full, full])
    with pytest.raises(ValueError, match=r"keep_sets\[3\] has positions outside \[0, 19\)"):
        _call(tiny, keep_sets=[full, full, full, np.append(full, length)])
    with pytest.raises(ValueError, match=r"keep_sets\[0\] repeats"):
        _call(tiny, keep_sets=[np.append(full, 4), full, full, full])
    with pytest.raises(ValueError, match=r"keep_sets must hold one index set per block \(4"):
        _call(tiny, keep_sets=[full] * 3)
    with pytest.raises(ValueError, match="give keep_sets, or keep_far / fold_window, not both"):
        _call(tiny, keep_sets=[full] * 4, keep_far=2)
    with pytest.raises(ValueError, match="terminal_mask"):
        _call(tiny, terminal_mask="yes")
    # a legal sparse set: the block, everything before it, and the last position
    ok = [np.append(np.arange(p + 4 * (b + 1)), length - 1) if b < 3 else full
          for b in range(4)]
    _, stats = _call(tiny, keep_sets=ok, return_stats=True)
    assert list(stats["tokens_per_step"]) == [8, 8, 12, 12, 16, 16, 19, 19]
