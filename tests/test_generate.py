"""Generation against the reference (transformers ``generate``) on identical random weights, plus invariants.

The twin uses a large init_std (0.5) so random logits are well separated (ties never decide a token), and a scaled-up
EOS embedding row so hypotheses end at different lengths (exercising padding, finished sets and batch pruning).
"""

from __future__ import annotations

import copy
import gc
import warnings

import pytest
import torch

from conftest import random_batch, reference_twin, small_model
import pegasus_x.cache as cache_module
import pegasus_x.generate as generate_module
from pegasus_x import GenerationError, native
from pegasus_x.cache import new_cache

EOS, PAD = 1, 0
LENGTHS = [30, 7, 13]          # right padded; 30 > 3 blocks of 8 with staggering
NEW = 12


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine a busy second core makes every
    2-thread op wait for it (measured: this file 8 s alone, 75 s beside another job)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def twin(tmp_path_factory, one_thread):
    ref, ours, _ = reference_twin(tmp_path_factory.mktemp("gen"), seed=3, init_std=0.5)
    with torch.no_grad():
        ref.model.shared.weight[EOS] *= 2.0          # make EOS competitive (shared = tied LM head)
        ours.model.shared.weight[EOS].copy_(ref.model.shared.weight[EOS])
    ours.eval()
    ids, mask, _ = random_batch(LENGTHS, ref.config.vocab_size, seed=5)
    return ref, ours, ids, mask


def _reference(ref, ids, mask, **options):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ref.generate(ids, attention_mask=mask, **options)


def _pad_after_eos(seqs: torch.Tensor) -> torch.Tensor:
    """The reference pads beam outputs with EOS when pad_token_id is 0 (`pad or eos`); we pad with pad."""
    seqs = seqs.clone()
    for row in seqs:
        ends = (row[1:] == EOS).nonzero()
        if len(ends):
            row[int(ends[0]) + 2:] = PAD
    return seqs


def _ended_early(seqs: torch.Tensor) -> int:
    return sum(bool((row[1:-1] == EOS).any()) for row in seqs)


CASES = {
    "greedy": dict(),
    "beam2-lp0.8-es-false": dict(num_beams=2, length_penalty=0.8, early_stopping=False),
    "beam2-lp1.2-es-true": dict(num_beams=2, length_penalty=1.2, early_stopping=True),
    "beam4-lp0.8-es-true": dict(num_beams=4, length_penalty=0.8, early_stopping=True),
    "beam4-lp1.2-es-false": dict(num_beams=4, length_penalty=1.2, early_stopping=False),
    "beam4-lp1.2-never": dict(num_beams=4, length_penalty=1.2, early_stopping="never"),
    "beam4-return2": dict(num_beams=4, num_return_sequences=2, length_penalty=0.8),
    "greedy-min-new-tokens": dict(min_new_tokens=8),
    "beam3-min-new-tokens": dict(num_beams=3, min_new_tokens=6),
    "greedy-no-repeat-3": dict(no_repeat_ngram_size=3),
    "beam4-no-repeat-3": dict(num_beams=4, no_repeat_ngram_size=3),
    "greedy-repetition-1.3": dict(repetition_penalty=1.3),
    "beam2-repetition-1.3": dict(num_beams=2, repetition_penalty=1.3),
    "greedy-bad-words-encoder-ngram": dict(bad_words_ids=[[5], [7, 8], [EOS]], encoder_no_repeat_ngram_size=2),
    "greedy-no-forced-eos": dict(forced_eos_token_id=None, max_new_tokens=20),
}


@pytest.mark.parametrize("case", list(CASES))
def test_token_identical_to_reference(twin, case):
    ref, ours, ids, mask = twin
    options = {"max_new_tokens": NEW, **CASES[case]}
    expected = _reference(ref, ids, mask, **options)
    got = ours.generate(ids, attention_mask=mask, **options)
    if options.get("num_beams", 1) > 1:
        expected = _pad_after_eos(expected)
    assert got.dtype == torch.long and got.shape == expected.shape, (got.shape, expected.shape)
    assert torch.equal(got, expected), f"\n{got}\n{expected}"
    assert bool((got[:, 0] == 0).all())


@pytest.mark.parametrize("case", ["greedy", "beam4-lp1.2-es-false", "beam2-lp1.2-es-true", "beam4-return2"])
def test_sparse_finish_checks_match_reference(twin, monkeypatch, case):
    """On accelerators finished inputs are only checked every few steps (they ride along meanwhile, emitting pad);
    force that schedule on CPU: results must not change."""
    import pegasus_x.generate as gen

    monkeypatch.setattr(gen, "_sync_every", lambda device: 3)
    ref, ours, ids, mask = twin
    options = {"max_new_tokens": NEW, **CASES[case]}
    expected = _reference(ref, ids, mask, **options)
    got = ours.generate(ids, attention_mask=mask, **options)
    assert torch.equal(got, _pad_after_eos(expected) if "beam" in case else expected)


@pytest.mark.parametrize("early_stopping", [True, False, "never"])
@pytest.mark.parametrize("length_penalty", [0.8, 1.2, -0.5])
def test_beam_bookkeeping_matches_reference_helpers(twin, early_stopping, length_penalty):
    """Random alive/finished states through our finished-set merge and stop heuristic vs the reference's helpers
    (these branches rarely decide a token in end-to-end runs)."""
    from transformers.generation.utils import GenerationMixin as Ref

    import pegasus_x.generate as gen

    _, ours, _, _ = twin
    b, K, C, L = 4, 3, 6, 10
    opts = gen.resolve_options(ours, dict(num_beams=K, length_penalty=length_penalty, early_stopping=early_stopping,
                                          max_length=L), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        cur = int(torch.randint(1, L - 1, (1,), generator=g))
        filled = torch.rand(b, K, generator=g) < 0.6
        fin_scores = torch.where(filled, -torch.rand(b, K, generator=g) * 5, gen.NEG).sort(1, descending=True).values
        fin_done = fin_scores > gen.NEG
        fin_len = torch.where(fin_done, torch.randint(1, cur + 1, (b, K), generator=g), 0)
        fin_seqs = torch.randint(2, 50, (b, K, L), generator=g)
        cand_seqs = torch.randint(2, 50, (b, C, L), generator=g)
        cand_scores = (-torch.rand(b, C, generator=g) * 5 * cur).sort(1, descending=True).values
        ended = torch.rand(b, C, generator=g) < 0.4
        open_ = torch.rand(b, 1, generator=g) < 0.7
        run_scores = -torch.rand(b, K, generator=g) * 5 * cur
        st = gen.BeamState(cand_seqs[:, :K].clone(), run_scores, fin_seqs.clone(), fin_scores.clone(), fin_done.clone(),
                           fin_len.clone(), open_.clone())
        top = torch.arange(C) < K
        gen._update_finished(st, cand_seqs, cand_scores, ended & top, cur, opts)
        idx = lambda n: torch.where(torch.arange(L - 1) < n[..., None], 0, -1)  # noqa: E731  beam indices of length n
        seqs, scores, indices, done = Ref._update_finished_beams(
            Ref, fin_seqs, cand_seqs, fin_scores, cand_scores, idx(fin_len), idx(torch.full((b, C), cur)), open_,
            fin_done, ended, top, K, cur, 1, length_penalty, early_stopping)
        assert torch.equal(st.fin_seqs, seqs) and torch.equal(st.fin_scores, scores), trial
        assert torch.equal(st.fin_done, done) and torch.equal(st.fin_len, (indices >= 0).sum(-1)), trial
        gen._update_open(st, cur + 1, opts)
        expected = Ref._check_early_stop_heuristic(open_, run_scores, scores, done, cur + 1, L, 1, early_stopping,
                                                   length_penalty)
        assert torch.equal(st.open, expected), trial


def test_cases_exercise_early_ends(twin):
    """The comparisons above only mean something if some hypotheses end before max length."""
    ref, _, ids, mask = twin
    assert _ended_early(_reference(ref, ids, mask, max_new_tokens=NEW)) >= 1
    assert _ended_early(_reference(ref, ids, mask, max_new_tokens=NEW, num_beams=4)) >= 1


def test_sequences_scores_match_reference(twin):
    ref, ours, ids, mask = twin
    options = dict(max_new_tokens=NEW, num_beams=4, num_return_sequences=3, length_penalty=0.8)
    r = _reference(ref, ids, mask, return_dict_in_generate=True, output_scores=True, **options)
    o = ours.generate(ids, attention_mask=mask, return_dict_in_generate=True, **options)
    assert torch.equal(o.sequences, _pad_after_eos(r.sequences))
    torch.testing.assert_close(o.sequences_scores, r.sequences_scores, atol=1e-4, rtol=0)


def test_batch_rows_equal_single_inputs(twin):
    """Right padding and pruning finished inputs must not change any input's result."""
    _, ours, ids, mask = twin
    for options in (dict(), dict(num_beams=3, length_penalty=0.8)):
        batch = ours.generate(ids, attention_mask=mask, max_new_tokens=NEW, **options)
        for i, n in enumerate(LENGTHS):
            alone = ours.generate(ids[i:i + 1, :n], max_new_tokens=NEW, **options)[0]
            assert torch.equal(batch[i, :alone.shape[0]], alone)
            assert bool((batch[i, alone.shape[0]:] == PAD).all())


def _teacher_forced_logprobs(model, ids, mask, seqs):
    """log_softmax of full-recompute logits (no cache): ``(N, L-1, V)`` predicting seqs[:, 1:]."""
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, decoder_input_ids=seqs[:, :-1]).logits.float().log_softmax(-1)


@pytest.mark.parametrize("first_chunk", [256, 2], ids=["one-buffer", "growing"])
def test_incremental_decoding_equals_full_recomputation(twin, monkeypatch, first_chunk):
    """Step-by-step logits through the cache (2 rows per input sharing its cross K/V, rows reordered twice and
    inputs dropped midway) equal logits of one full forward pass — also when the buffers grow (2 → 4 → 7) between
    the reorders."""
    monkeypatch.setattr(cache_module, "FIRST_CHUNK", first_chunk)
    _, ours, ids, mask = twin
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(2, ours.config.vocab_size, (6, 7), generator=g)
    seqs[:, 0] = 0
    with torch.no_grad():
        enc = ours.encode(ids, mask)
        cache = new_cache(ours, enc.last_hidden_state, enc.attention_mask, rows=6, max_len=7)
        decoder = ours.get_decoder()
        steps, rows, inputs = [], torch.arange(6), torch.arange(3)
        for t in range(7):
            if t == 3:                      # swap the two rows of every input: the cache must follow
                order = torch.tensor([1, 0, 3, 2, 5, 4])
                cache.reorder(order)
                rows = rows[order]
            if t == 4:                      # some rows stay, some copy another, two swap
                order = torch.tensor([0, 0, 2, 2, 5, 4])
                cache.reorder(order)
                rows = rows[order]
            if t == 5:                      # drop input 1 (rows 2, 3)
                cache.keep_inputs(torch.tensor([0, 2]))
                rows, inputs = rows[[0, 1, 4, 5]], inputs[[0, 2]]
            h = decoder(seqs[rows, t:t + 1], None, None, cache=cache)
            steps.append((rows.clone(), ours.lm_head(h)[:, 0]))
        full = ours(input_ids=ids.repeat_interleave(2, 0), attention_mask=mask.repeat_interleave(2, 0),
                    decoder_input_ids=seqs).logits
    for t, (r, logits) in enumerate(steps):
        torch.testing.assert_close(logits, full[r, t], atol=1e-4, rtol=1e-5)
    assert cache.max_len == 7 and cache.positions.shape[0] == 7


def test_gnmt_alpha_scores_follow_the_formula(twin):
    """Independent check: every returned score is (sum of teacher-forced log-probs) / ((5+len)/6)**alpha with len the
    generated length (EOS included), the hypotheses come ranked by it, and it differs from len**alpha."""
    _, ours, ids, mask = twin
    alpha, beams = 0.6, 4
    out = ours.generate(ids, attention_mask=mask, max_new_tokens=NEW, num_beams=beams, num_return_sequences=beams,
                        gnmt_alpha=alpha, forced_eos_token_id=None, return_dict_in_generate=True)
    rep = lambda t: t.repeat_interleave(beams, 0)  # noqa: E731
    logp = _teacher_forced_logprobs(ours, rep(ids), rep(mask), out.sequences)
    differs = False
    for i, seq in enumerate(out.sequences):
        ends = (seq[1:] == EOS).nonzero()
        n = int(ends[0]) + 1 if len(ends) else seq.shape[0] - 1
        total = float(logp[i, torch.arange(n), seq[1:n + 1]].sum())
        assert out.sequences_scores[i].item() == pytest.approx(total / ((5 + n) / 6) ** alpha, abs=1e-4)
        differs |= abs(total / ((5 + n) / 6) ** alpha - total / n ** alpha) > 1e-3
    scores = out.sequences_scores.view(-1, beams)
    assert bool((scores[:, :-1] >= scores[:, 1:]).all()), "hypotheses must come best first"
    assert differs


def test_sampling_is_reproducible_and_respects_top_k_top_p(twin):
    _, ours, ids, mask = twin
    common = dict(do_sample=True, max_new_tokens=NEW, forced_eos_token_id=None, num_return_sequences=2)
    a = ours.generate(ids, attention_mask=mask, seed=7, top_k=5, **common)
    b = ours.generate(ids, attention_mask=mask, generator=torch.Generator().manual_seed(7), top_k=5, **common)
    assert torch.equal(a, b)
    draws = {tuple(ours.generate(ids, attention_mask=mask, seed=s, top_k=0, **common)[0].tolist()) for s in range(4)}
    assert len(draws) > 1, "different seeds should give different samples"
    rep = lambda t: t.repeat_interleave(2, 0)  # noqa: E731
    for options, allowed in ((dict(top_k=3), _top_k_allowed(3)), (dict(top_k=0, top_p=0.6), _top_p_allowed(0.6))):
        seqs = ours.generate(ids, attention_mask=mask, seed=3, **options, **common)
        logp = _teacher_forced_logprobs(ours, rep(ids), rep(mask), seqs)
        for i, seq in enumerate(seqs):
            for t in range(1, seq.shape[0]):
                if seq[t - 1] == EOS or (t > 1 and seq[t - 1] == PAD):
                    break
                assert int(seq[t]) in allowed(logp[i, t - 1]), (options, i, t)


def test_sampling_with_a_tiny_repetition_penalty_draws_a_seen_token(twin):
    # fp32's smallest normal (the smallest penalty allowed) divides a seen token's logit above 4 into +inf (once NaN
    # in the softmax). Clamped to the largest float, the seen tokens with positive logits hold all the probability:
    # every draw must be one of them.
    _, ours, ids, mask = twin
    seqs = ours.generate(ids[:1], attention_mask=mask[:1], do_sample=True, seed=0, top_k=0, max_new_tokens=4,
                         min_new_tokens=4, repetition_penalty=torch.finfo(torch.float32).tiny,
                         forced_eos_token_id=None)
    assert seqs.shape == (1, 5)
    with torch.no_grad():
        logits = ours(input_ids=ids[:1], attention_mask=mask[:1], decoder_input_ids=seqs[:, :-1]).logits[0]
    checked = 0
    for t in range(1, 5):
        boosted = {int(tok) for tok in seqs[0, :t] if logits[t - 1, tok] > 0}
        if boosted:
            assert int(seqs[0, t]) in boosted, t
            checked += 1
    assert checked, "no step had a seen token with a positive logit; pick another seed"


def _top_k_allowed(k):
    return lambda logp: set(logp.topk(k).indices.tolist())


def _top_p_allowed(p):
    def allowed(logp):
        probs, order = logp.exp().sort(descending=True)
        # The smallest prefix whose mass reaches p, computed independently of the warper's ascending formulation.
        n = int((probs.cumsum(0) < p - 1e-6).sum()) + 1
        return set(order[:n + 1].tolist())      # +1: tolerate float noise at the boundary token
    return allowed


def test_streamer_receives_every_step(twin):
    _, ours, ids, mask = twin
    steps = []
    seqs = ours.generate(ids, attention_mask=mask, max_new_tokens=NEW, streamer=steps.append)
    assert torch.equal(torch.stack(steps, 1), seqs[:, 1:])

    class Recorder:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, tokens):
            self.puts.append(tokens)

        def end(self):
            self.ended = True

    rec = Recorder()
    seqs = ours.generate(ids[:1], max_new_tokens=NEW, streamer=rec)
    assert rec.ended and torch.equal(rec.puts[0], seqs[:, :1])   # the prompt (start token) first, like transformers
    assert torch.equal(torch.stack(rec.puts[1:], 1), seqs[:, 1:])


def test_min_equal_max_forces_length_and_final_eos(twin):
    _, ours, ids, mask = twin
    for options in (dict(), dict(num_beams=4)):
        out = ours.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, **options)
        assert out.shape == (3, NEW + 1)
        assert bool((out[:, -1] == EOS).all()) and not bool((out[:, 1:-1] == EOS).any())


def test_bf16_and_stored_max_length(twin):
    _, ours, ids, mask = twin
    model = copy.deepcopy(ours).to(torch.bfloat16)
    for options in (dict(), dict(num_beams=3)):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, **options)
        assert out.shape[0] == 3 and 2 <= out.shape[1] <= 7 and bool((out[:, 0] == 0).all())
    # A stored max_length is used as it is, like transformers (no cap): it counts the start token.
    model.generation_config = {"max_length": 40, "decoder_start_token_id": 0, "eos_token_id": 1}
    out = model.generate(ids[:1], min_new_tokens=10 ** 4)   # EOS banned throughout
    assert out.shape[1] == 40


# ------------------------------------------------------------------------------------ buffers that grow
def _generate_recording_cache(model, ids, mask, monkeypatch, first_chunk, **options):
    """generate() with buffers that start at ``first_chunk`` positions → (output, the cache it used)."""
    monkeypatch.setattr(cache_module, "FIRST_CHUNK", first_chunk)
    monkeypatch.setattr(generate_module, "FIRST_CHUNK", first_chunk)
    caches = []
    monkeypatch.setattr(generate_module, "new_cache", lambda *a: caches.append(new_cache(*a)) or caches[-1])
    out = model.generate(ids, attention_mask=mask, return_dict_in_generate=True, **options)
    return out, caches[0]


@pytest.fixture(params=["native", "torch"])
def kernels(request, monkeypatch):
    """The CPU decode kernels (where a C compiler built them) or torch's (``PEGASUS_X_NATIVE=0``)."""
    native.library.cache_clear()
    if request.param == "torch":
        monkeypatch.setenv("PEGASUS_X_NATIVE", "0")
    yield request.param
    native.library.cache_clear()


GROW = {
    "greedy": dict(forced_eos_token_id=None),
    "beam4": dict(num_beams=4, length_penalty=1.2),
    "beam2-min-new": dict(num_beams=2, min_new_tokens=10),
    "sample-return2": dict(do_sample=True, num_return_sequences=2, seed=7),
}


@pytest.mark.parametrize("case", list(GROW))
def test_growing_buffers_are_token_exact(twin, monkeypatch, kernels, case):
    """Buffers that start at 3 positions and grow (3 → 6 → 12 → 20) give the tokens and scores of buffers sized
    for max_new_tokens at once, through beam reorders, inputs leaving the batch, and both kernel paths."""
    _, ours, ids, mask = twin
    options = {"max_new_tokens": 20, **GROW[case]}
    whole, whole_cache = _generate_recording_cache(ours, ids, mask, monkeypatch, 10 ** 6, **options)
    grown, grown_cache = _generate_recording_cache(ours, ids, mask, monkeypatch, 3, **options)
    assert whole_cache.max_len == 20 and 3 < grown_cache.max_len <= 20
    assert torch.equal(grown.sequences, whole.sequences), f"\n{grown.sequences}\n{whole.sequences}"
    if whole.sequences_scores is not None:
        assert torch.equal(grown.sequences_scores, whole.sequences_scores)
    if case == "greedy" and kernels == "native" and native.library() is not None:
        assert grown_cache.native_plan                           # the kernels ran on the grown buffers
    assert _ended_early(whole.sequences) and grown.sequences.shape[1] > 7   # inputs left; the buffers grew


def _eos_after(model, steps):
    """A copy of ``model`` whose decoder output is the EOS embedding whatever the input: with
    ``min_new_tokens=steps - 1`` every summary is ``steps`` tokens long (EOS last)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        norm = model.get_decoder().layer_norm
        norm.weight.zero_()
        norm.bias.copy_(model.model.shared.weight[EOS])         # EOS's row is the longest (the twin doubled it)
    return model


@pytest.mark.parametrize("options", [dict(), dict(num_beams=3, early_stopping=True)], ids=["greedy", "beam3"])
def test_memory_follows_the_output_not_max_new_tokens(twin, monkeypatch, options):
    """A 48-token summary with max_new_tokens=10**8 allocates what max_new_tokens=64 does (the cache, its position
    table and the token buffers), and gives the same tokens."""
    _, ours, ids, mask = twin
    model = _eos_after(ours, 48)
    widths = []
    widen = generate_module._widen
    monkeypatch.setattr(generate_module, "_widen", lambda seqs, width, pad: widths.append(width) or
                        widen(seqs, width, pad))
    small, small_cache = _generate_recording_cache(model, ids, mask, monkeypatch, cache_module.FIRST_CHUNK,
                                                   max_new_tokens=64, min_new_tokens=47, **options)
    assert small.sequences.shape[1] == 49 and bool((small.sequences[:, 48] == EOS).all())
    huge, huge_cache = _generate_recording_cache(model, ids, mask, monkeypatch, cache_module.FIRST_CHUNK,
                                                 max_new_tokens=10 ** 8, min_new_tokens=47, **options)
    assert torch.equal(huge.sequences, small.sequences)
    assert small_cache.max_len == 64 and huge_cache.max_len == cache_module.FIRST_CHUNK
    assert huge_cache.positions.shape[0] == huge_cache.max_len
    assert max(widths) <= cache_module.FIRST_CHUNK


BAD = {
    "max_new_tokens 0": dict(max_new_tokens=0),
    "max_length 1": dict(max_length=1),
    "num_beams 0": dict(num_beams=0),
    "return > beams": dict(num_beams=2, num_return_sequences=3),
    "greedy returns 2": dict(num_return_sequences=2),
    "top_p 0": dict(do_sample=True, top_p=0.0),
    "top_p 1.5": dict(do_sample=True, top_p=1.5),
    "temperature 0": dict(do_sample=True, temperature=0.0),
    "temperature -1": dict(temperature=-1.0),
    "unknown name": dict(max_tokens=5),
    "early_stopping str": dict(num_beams=2, early_stopping="sometimes"),
    "bool as int": dict(num_beams=True),
    "bad words shape": dict(bad_words_ids=[5, 6]),
    "bad words id": dict(bad_words_ids=[[10 ** 6]]),
    "repetition 0": dict(repetition_penalty=0.0),
    "repetition 0 in fp32": dict(repetition_penalty=1e-69),
    "seed and generator": dict(do_sample=True, seed=1, generator=torch.Generator()),
    "streamer with beams": dict(num_beams=2, streamer=print),
    "eos out of vocab": dict(eos_token_id=-1),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_options_raise(twin, case):
    _, ours, ids, mask = twin
    options = {"max_new_tokens": 3, **BAD[case]}
    with pytest.raises(GenerationError):
        ours.generate(ids, attention_mask=mask, **options)


def test_bad_inputs_raise_input_error(twin):
    from pegasus_x import InputError

    _, ours, ids, _ = twin
    with pytest.raises(InputError):
        ours.generate(ids.float(), max_new_tokens=3)
    with pytest.raises(InputError):
        ours.generate(ids, attention_mask=torch.zeros_like(ids), max_new_tokens=3)


def test_finished_inputs_are_checked_every_step_on_the_cpu_and_every_sync_every_elsewhere():
    assert generate_module._sync_every(torch.device("cpu")) == 1
    assert generate_module._sync_every(torch.device("meta")) == generate_module.SYNC_EVERY > 1



@pytest.mark.parametrize("native_on", [True, False], ids=["native", "reference"])
@pytest.mark.parametrize("options", [dict(), dict(num_beams=3), dict(prompt_lookup_num_tokens=4),
                                     dict(do_sample=True, seed=1)], ids=["greedy", "beam", "lookahead", "sample"])
def test_generate_leaves_nothing_for_the_cycle_collector(options, native_on):
    # A reference cycle through the decoding state would keep each call's cache (the cross-attention keys/values of
    # every input) in memory until the cycle collector happened to run.
    model = small_model()
    model.set_native(native_on)
    ids = torch.randint(3, 100, (2, 30), generator=torch.Generator().manual_seed(0))
    model.generate(ids, max_new_tokens=5, **options)                # first call: whatever is built once
    gc.collect()
    gc.disable()
    try:
        model.generate(ids, max_new_tokens=5, **options)
        assert gc.collect() == 0
    finally:
        gc.enable()
