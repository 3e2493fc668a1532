"""The logits processors (pegasus_x.processors) on hand-made scores: each rule bans or rescales exactly the tokens
the reference's rule names. Generation with them against transformers: test_generate.py."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_kwargs
from pegasus_x import PegasusXConfig, PegasusXForConditionalGeneration
from pegasus_x.generate import resolve_options
from pegasus_x.processors import build_processors, process

V = 96
EOS = 1
MODEL = PegasusXForConditionalGeneration(PegasusXConfig(**tiny_kwargs()))


def run(scores, hist, encoder_ids=None, **options):
    """Scores after the processors these generation options build (one input per row)."""
    opts = resolve_options(MODEL, {"max_new_tokens": 10, **options}, torch.device("cpu"))
    encoder_ids = torch.zeros(hist.shape[0], 1, dtype=torch.long) if encoder_ids is None else encoder_ids
    procs = build_processors(opts, encoder_ids)
    return process(procs, scores.clone(), hist, torch.arange(hist.shape[0]))


def banned(scores) -> set[int]:
    return set(torch.nonzero(scores[0] == -math.inf).flatten().tolist())


def scores_row():
    return torch.linspace(-3.0, 3.0, V)[None]


def test_repetition_penalty_rescales_seen_tokens_only():
    s = scores_row()
    hist = torch.tensor([[0, 2, 90]])            # score of 2 is negative, of 90 positive
    out = run(s, hist, repetition_penalty=2.0, forced_eos_token_id=None)
    assert out[0, 2] == s[0, 2] * 2 and out[0, 90] == s[0, 90] / 2 and out[0, 0] == s[0, 0] * 2
    untouched = torch.ones(V, dtype=torch.bool)
    untouched[[0, 2, 90]] = False
    assert torch.equal(out[0, untouched], s[0, untouched])


def test_no_repeat_ngram_bans_the_token_that_would_repeat_an_ngram():
    hist = torch.tensor([[0, 5, 6, 7, 5]])
    assert banned(run(scores_row(), hist, no_repeat_ngram_size=2, forced_eos_token_id=None)) == {6}
    assert banned(run(scores_row(), hist, no_repeat_ngram_size=3, forced_eos_token_id=None)) == set()


def test_encoder_no_repeat_ngram_bans_ngrams_of_the_source():
    hist = torch.tensor([[0, 8]])
    out = run(scores_row(), hist, encoder_ids=torch.tensor([[7, 8, 9, 8, 4]]), encoder_no_repeat_ngram_size=2,
              forced_eos_token_id=None)
    assert banned(out) == {9, 4}


def test_bad_words_ban_single_tokens_always_and_sequences_after_their_prefix():
    words = [[4], [5, 6], [7, 8, 9]]
    assert banned(run(scores_row(), torch.tensor([[0, 3]]), bad_words_ids=words, forced_eos_token_id=None)) == {4}
    assert banned(run(scores_row(), torch.tensor([[0, 5]]), bad_words_ids=words, forced_eos_token_id=None)) == {4, 6}
    assert banned(run(scores_row(), torch.tensor([[7, 8]]), bad_words_ids=words, forced_eos_token_id=None)) == {4, 9}


def test_length_rules_hold_back_then_force_eos():
    short = run(scores_row(), torch.zeros(1, 3, dtype=torch.long), min_new_tokens=4)
    assert banned(short) == {EOS}
    assert banned(run(scores_row(), torch.zeros(1, 5, dtype=torch.long), min_new_tokens=4)) == set()
    last = run(scores_row(), torch.zeros(1, 10, dtype=torch.long), max_new_tokens=10, forced_eos_token_id=EOS)
    assert banned(last) == set(range(V)) - {EOS}


@pytest.mark.parametrize("top_k, top_p, kept", [(5, 1.0, 5), (0, 0.5, None)])
def test_sampling_warpers_keep_the_top_tokens(top_k, top_p, kept):
    s = torch.randn(1, V, generator=torch.Generator().manual_seed(0))
    out = run(s, torch.zeros(1, 2, dtype=torch.long), do_sample=True, top_k=top_k, top_p=top_p,
              forced_eos_token_id=None)
    order = s[0].argsort(descending=True)
    if kept is None:                             # nucleus: the fewest top tokens holding at least top_p
        mass = s[0, order].softmax(-1).cumsum(-1)
        kept = int((mass < top_p).sum()) + 1
    assert set(torch.nonzero(out[0] > -math.inf).flatten().tolist()) == set(order[:kept].tolist())
