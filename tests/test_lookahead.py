"""Lookahead decoding (``prompt_lookup_num_tokens``): the same tokens as plain decoding, in fewer decoder passes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import random_batch, tiny_kwargs
from pegasus_x import PegasusXConfig, PegasusXForConditionalGeneration
from pegasus_x import lookahead
from pegasus_x.cache import new_cache
from pegasus_x.cli import main
from pegasus_x.errors import GenerationError
from pegasus_x.generate import resolve_options
from pegasus_x.processors import build_processors, process
from pegasus_x.summarize import demo_model_path
from pegasus_x.tokenizer import PegasusTokenizer

IDS = dict(decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
PROCESSORS = [
    {},
    dict(no_repeat_ngram_size=2),
    dict(repetition_penalty=1.3),
    dict(min_new_tokens=12, forced_eos_token_id=1),
    dict(bad_words_ids=[[5], [7, 8], [9, 10, 11]]),
    dict(encoder_no_repeat_ngram_size=3),
    dict(no_repeat_ngram_size=3, repetition_penalty=0.8, min_new_tokens=5, forced_eos_token_id=1),
]


def tiny(seed: int = 0, **overrides) -> PegasusXForConditionalGeneration:
    torch.manual_seed(seed)
    return PegasusXForConditionalGeneration(PegasusXConfig(**tiny_kwargs(**overrides))).eval()


@pytest.fixture(scope="module")
def model():
    return tiny()


def run(model, ids, mask, **options):
    return model.generate(ids, mask, **{**IDS, "return_dict_in_generate": True, **options})


# Lengths 30 and 21 span several encoder blocks (block 8); the batch is padded.
BATCH = random_batch([13, 30, 7, 21], 96, seed=1)[:2]


@pytest.mark.parametrize("k", [1, 4, 8])
@pytest.mark.parametrize("options", PROCESSORS)
def test_greedy_is_token_identical_across_processors(model, options, k):
    ids, mask = BATCH
    plain = run(model, ids, mask, max_new_tokens=40, **options)
    ahead = run(model, ids, mask, max_new_tokens=40, prompt_lookup_num_tokens=k, **options)
    assert torch.equal(ahead.sequences, plain.sequences)
    assert plain.decoder_passes == plain.sequences.shape[1] - 1
    assert ahead.decoder_passes <= plain.decoder_passes


def test_drafts_save_passes_and_single_inputs_equal_the_batch(model):
    ids, mask = BATCH
    plain = run(model, ids, mask, max_new_tokens=40)
    ahead = run(model, ids, mask, max_new_tokens=40, prompt_lookup_num_tokens=4)
    assert ahead.decoder_passes < 0.8 * plain.decoder_passes      # random weights repeat themselves: drafts hit
    for i in range(ids.shape[0]):
        one = run(model, ids[i:i + 1], mask[i:i + 1], max_new_tokens=40, prompt_lookup_num_tokens=4)
        n = one.sequences.shape[1]
        assert torch.equal(one.sequences[0], plain.sequences[i, :n])
        assert (plain.sequences[i, n:] == 0).all()


def test_drafts_come_from_the_source(model):
    """A source that holds the greedy output: after its first token, whole drafts are accepted."""
    ids, mask = BATCH
    plain = run(model, ids[:1], mask[:1], max_new_tokens=24, eos_token_id=None)
    out = plain.sequences[0, 1:]
    source = torch.cat([torch.tensor([50, 51, 52]), out, torch.tensor([53])])[None]
    # Drafts look in the source; the encoder still reads the original input.
    enc = model.get_encoder()(input_ids=ids[:1], attention_mask=mask[:1])
    ahead = model.generate(source, None, encoder_outputs=enc, **{**IDS, "eos_token_id": None},
                           max_new_tokens=24, prompt_lookup_num_tokens=8, return_dict_in_generate=True)
    assert torch.equal(ahead.sequences, plain.sequences)
    assert ahead.decoder_passes <= 1 + math.ceil(23 / 9) + 1


def _always(monkeypatch, reference: torch.Tensor, right: bool) -> None:
    """Replace the drafter by one that knows the plain output ``reference`` (one row): always right or always
    wrong."""
    def fake(row, k):
        at = 1 + len(row.out)
        nxt = reference[at:at + k].tolist()
        return nxt if right else [(t + 1) % 96 for t in nxt]
    monkeypatch.setattr(lookahead, "draft", fake)


@pytest.mark.parametrize("k", [1, 4, 8])
def test_always_wrong_drafts_change_nothing_and_right_ones_save_passes(model, monkeypatch, k):
    ids, mask = BATCH
    options = dict(max_new_tokens=30, no_repeat_ngram_size=3, min_new_tokens=4)
    plain = run(model, ids[1:2], mask[1:2], **options)
    _always(monkeypatch, plain.sequences[0], right=False)
    wrong = run(model, ids[1:2], mask[1:2], prompt_lookup_num_tokens=k, **options)
    assert torch.equal(wrong.sequences, plain.sequences) and wrong.decoder_passes == plain.decoder_passes
    _always(monkeypatch, plain.sequences[0], right=True)
    right = run(model, ids[1:2], mask[1:2], prompt_lookup_num_tokens=k, **options)
    assert torch.equal(right.sequences, plain.sequences)
    assert right.decoder_passes == math.ceil(plain.decoder_passes / (k + 1))


def test_cache_rollback_equals_recomputation(model):
    """Feed a start token and a 4-token draft in one pass, keep 2 of the draft, go on: the cache and the logits
    equal those of a cache that only ever saw the kept tokens."""
    ids, mask = BATCH
    with torch.inference_mode():
        enc = model.encode(ids, mask)
        decoder = model.get_decoder()

        def cache():
            return new_cache(model, enc.last_hidden_state, enc.attention_mask, ids.shape[0], 20)
        a, b = cache(), cache()
        draft = torch.randint(2, 96, (4, 5), generator=torch.Generator().manual_seed(3))
        decoder(draft, None, None, cache=a)
        a.rollback(3)
        decoder(draft[:, :3], None, None, cache=b)
        nxt = torch.tensor([[7], [8], [9], [10]])
        ha, hb = decoder(nxt, None, None, cache=a), decoder(nxt, None, None, cache=b)
        assert a.length == b.length == 4
        for ka, kb in zip(a.self_k + a.self_v, b.self_k + b.self_v):
            torch.testing.assert_close(ka[:, :, :4], kb[:, :, :4])
        torch.testing.assert_close(ha, hb)
        with pytest.raises(RuntimeError, match="cannot roll"):
            a.rollback(5)


def test_beam_search_stays_plain(model):
    ids, mask = BATCH
    plain = run(model, ids, mask, max_new_tokens=12, num_beams=3)
    ahead = run(model, ids, mask, max_new_tokens=12, num_beams=3, prompt_lookup_num_tokens=4)
    assert torch.equal(ahead.sequences, plain.sequences) and ahead.decoder_passes == plain.decoder_passes


@pytest.mark.parametrize("value", [-1, 65, 2.5, "4", True])
def test_bad_values_raise(model, value):
    ids, mask = BATCH
    with pytest.raises(GenerationError, match="prompt_lookup_num_tokens"):
        run(model, ids, mask, max_new_tokens=4, prompt_lookup_num_tokens=value)


def test_zero_and_none_are_off(model):
    ids, mask = BATCH
    plain = run(model, ids, mask, max_new_tokens=10)
    for value in (0, None):
        assert run(model, ids, mask, max_new_tokens=10, prompt_lookup_num_tokens=value).decoder_passes == \
            plain.decoder_passes


def test_streamer_sees_plain_decodings_steps(model):
    ids, mask = BATCH
    seen: dict[int, list] = {0: [], 4: []}
    for k in seen:
        run(model, ids, mask, max_new_tokens=20, prompt_lookup_num_tokens=k, streamer=seen[k].append)
    assert len(seen[0]) == len(seen[4]) and all(torch.equal(a, b) for a, b in zip(seen[0], seen[4]))


# ---------------------------------------------------------------------------------------------------- sampling
def _chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of Pearson's test of ``counts`` against ``probs`` (cells with expected count < 5 pooled)."""
    expected = probs * counts.sum()
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    stat = ((obs - exp) ** 2 / exp.clamp(min=1e-12)).sum()
    dof = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat.double() / 2))


def _bigram_step(table: torch.Tensor, cache):
    """A stand-in decoder whose next-token logits depend on the current token only: ``table[token]``."""
    def step(tokens, every=False):
        step.passes += 1
        cache.length += tokens.shape[1]
        return table[tokens] if every else table[tokens[:, -1]]
    step.passes = 0
    return step


class _Cache:
    """What lookahead_search uses of a DecoderCache, for the stand-in decoder."""

    def __init__(self):
        self.length, self.cross_k = 0, [torch.zeros(1)]

    def rollback(self, length):
        assert length <= self.length
        self.length = length


@pytest.mark.parametrize("warpers", [dict(temperature=1.5),
                                     pytest.param(dict(top_k=3, top_p=0.9), marks=pytest.mark.slow)])
def test_sampling_rule_is_exact_in_distribution(monkeypatch, warpers):
    """Three tokens from a vocabulary of 4 under a bigram stand-in for the decoder: lookahead sampling (drafts of
    up to 2 tokens, right about a quarter of the time, accepted or replaced position by position) matches the exact
    distribution of the sequences, warpers included."""
    V, T, N, K = 4, 3, 3000, 2
    model = tiny(vocab_size=V)
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(5)) * 1.5
    opts = resolve_options(model, dict(IDS, eos_token_id=None, forced_eos_token_id=None, do_sample=True, seed=3,
                                       max_new_tokens=T, prompt_lookup_num_tokens=K, **warpers), torch.device("cpu"))
    source = torch.tensor([[2, 3]])
    procs = build_processors(opts, source)
    monkeypatch.setattr(lookahead, "draft", lambda row, k: [(len(row.out) + i) % V for i in range(k)])
    counts = torch.zeros(V ** T, dtype=torch.float64)
    passes = 0
    for _ in range(N):
        cache = _Cache()
        step = _bigram_step(table, cache)
        seq = lookahead.lookahead_search(step, cache, opts, procs, 1, lookahead.sources(None, source, 1)).sequences
        passes += step.passes
        counts[int((seq[0, 1:] * torch.tensor([V * V, V, 1])).sum())] += 1
    assert passes < 0.9 * N * T                   # drafts were kept (each kept draft saves a pass)
    # The exact distribution: product of the processed next-token probabilities (warpers depend on no history).
    hist = torch.zeros(1, 1, dtype=torch.long)
    probs = process(procs, table.clone(), hist.expand(V, 1), torch.zeros(V, dtype=torch.long)).softmax(-1)
    seqs = torch.cartesian_prod(*[torch.arange(V)] * T)
    exact = probs[0, seqs[:, 0]] * probs[seqs[:, 0], seqs[:, 1]] * probs[seqs[:, 1], seqs[:, 2]]
    assert _chi_square_p(counts, exact.double()) > 1e-3
    # The test can fail: keeping every draft token would be far from the distribution.
    wrong = torch.zeros(V ** T, dtype=torch.float64)
    wrong[int((torch.tensor([0, 1, 2]) * torch.tensor([V * V, V, 1])).sum())] = N
    assert _chi_square_p(wrong, exact.double()) < 1e-6


@pytest.mark.slow
def test_sampling_is_reproducible_and_exact_in_a_batch(monkeypatch):
    """The real model, one input, 6000 samples in one batch: reproducible with a seed, and the first three tokens
    follow the distribution computed by teacher forcing."""
    model = tiny(seed=4, vocab_size=8, init_std=0.1)
    V, N, T = 8, 6000, 3
    ids = torch.tensor([[3, 4, 5, 6, 7, 2, 3]])
    options = dict(decoder_start_token_id=0, eos_token_id=None, pad_token_id=0, forced_eos_token_id=None,
                   do_sample=True, temperature=1.5, max_new_tokens=T, num_return_sequences=N,
                   return_dict_in_generate=True)
    monkeypatch.setattr(lookahead, "draft", lambda row, k: [(2 + len(row.out) + i) % V for i in range(k)])
    out = model.generate(ids, seed=11, prompt_lookup_num_tokens=2, **options)
    again = model.generate(ids, seed=11, prompt_lookup_num_tokens=2, **options)
    assert torch.equal(out.sequences, again.sequences)
    seqs = torch.cartesian_prod(*[torch.arange(V)] * T)                  # (V^T, T): every possible output
    with torch.inference_mode():
        dec = torch.cat([torch.zeros(len(seqs), 1, dtype=torch.long), seqs], 1)
        logits = model(ids.expand(len(seqs), -1), decoder_input_ids=dec[:, :-1]).logits.float()
        logp = (logits / 1.5).log_softmax(-1).gather(2, seqs[:, :, None]).squeeze(2).sum(1)
    index = (out.sequences[:, 1:] * torch.tensor([V * V, V, 1])).sum(1)
    counts = torch.bincount(index, minlength=V ** T).double()
    assert _chi_square_p(counts, logp.exp().double()) > 1e-3


# ---------------------------------------------------------------------------------------------------- demo model
needs_demo = pytest.mark.skipif(demo_model_path() is None, reason="no bundled demo model in this checkout")


@needs_demo
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)])
def test_demo_model_greedy_is_token_identical(dtype):
    model = PegasusXForConditionalGeneration.from_pretrained(demo_model_path(), dtype=dtype).eval()
    tok = PegasusTokenizer.from_pretrained(demo_model_path())
    text = (Path(__file__).parents[1] / "examples" / "sample.txt").read_text()
    words = text.split()
    docs = [text, " ".join(words[:60]), " ".join(words[200:900])]       # the first one is longer than a block
    enc = tok(docs, return_tensors="pt", padding=True, truncation=True, max_length=1024)
    for k in (1, 4, 8):
        options = dict(num_beams=1, max_new_tokens=48, return_dict_in_generate=True)
        plain = model.generate(enc["input_ids"], enc["attention_mask"], **options)
        ahead = model.generate(enc["input_ids"], enc["attention_mask"], prompt_lookup_num_tokens=k, **options)
        assert torch.equal(ahead.sequences, plain.sequences)


@needs_demo
def test_cli_lookahead_flag(tmp_path, capsys):
    page = tmp_path / "page.txt"
    page.write_text((Path(__file__).parents[1] / "examples" / "sample.txt").read_text())
    outputs = []
    for flags in ([], ["--lookahead", "4"]):
        assert main(["summarize", "--num-beams", "1", "--max-new-tokens", "16", *flags, str(page)]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].strip()
    assert main(["summarize", "--lookahead", "-1", str(page)]) == 2
    assert "--lookahead: must be" in capsys.readouterr().err


def test_encoder_outputs_without_ids_draft_from_the_output(model):
    ids, mask = BATCH
    enc = model.get_encoder()(input_ids=ids, attention_mask=mask)
    plain = model.generate(encoder_outputs=enc, **IDS, max_new_tokens=30, return_dict_in_generate=True)
    ahead = model.generate(encoder_outputs=enc, **IDS, max_new_tokens=30, return_dict_in_generate=True,
                           prompt_lookup_num_tokens=4)
    assert torch.equal(ahead.sequences, plain.sequences) and ahead.decoder_passes < plain.decoder_passes
