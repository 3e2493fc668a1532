"""ROUGE-Lsum as the papers compute it: one sentence per line, split by the package's one splitter."""

from __future__ import annotations

import pytest
import torch

from conftest import sources_containing, tiny_kwargs
from pegasus_x import PegasusXConfig, PegasusXForConditionalGeneration, metrics, sentences
from pegasus_x.metrics import rouge_scores

rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer",
                                   reason="install the test extras: pip install -e '.[test]'")

REFERENCE = ("Dr. Smith measured the flow, e.g. in the main pipe. See Fig. 3 for the result. "
             "The pressure rose by 4 bar.\nJ. Doe repeated it.")
PREDICTION = "Result: see Fig. 3 for the flow Dr. Smith measured. The pressure rose, e.g. by 4 bar."


def test_lsum_equals_rouge_score_on_the_split_text():
    scorer = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=True)
    split = "\n".join(sentences.split_sentences(REFERENCE)), "\n".join(sentences.split_sentences(PREDICTION))
    expected = 100.0 * scorer.score(*split)["rougeLsum"].fmeasure
    assert rouge_scores([PREDICTION], [REFERENCE])["rougeLsum"] == pytest.approx(expected, abs=1e-12)
    # The split matters: on the unsplit text (one "sentence") Lsum is plain ROUGE-L, a different number.
    assert 100.0 * scorer.score(REFERENCE, PREDICTION)["rougeLsum"].fmeasure != pytest.approx(expected)


class _CharTokenizer:
    """Characters to ids 2..95 (vocabulary of the tiny model), ``</s>`` = 1 appended, pad 0."""

    pad_token_id = 0

    def __call__(self, texts, max_length=None, truncation=False):
        rows = [[2 + ord(c) % 94 for c in t] + [1] for t in texts]
        return {"input_ids": [r[:max_length - 1] + [1] if max_length and len(r) > max_length else r for r in rows]}

    def batch_decode(self, rows, skip_special_tokens=False):
        return [" ".join(str(int(i)) for i in row if int(i) > 1 or not skip_special_tokens) for row in rows]


def test_evaluation_generates_through_the_one_generate_and_decode_loop():
    torch.manual_seed(0)
    model = PegasusXForConditionalGeneration(PegasusXConfig(**tiny_kwargs(init_std=1.0))).train()
    tok = _CharTokenizer()
    sources = ["a short one", "a much longer source text than the others", "z"]
    options = {"max_new_tokens": 5, "num_beams": 1, "decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0}
    got = metrics.generate_texts(model, tok, sources, options, batch_size=2, progress=False)
    assert model.training    # the caller's mode is restored
    model.eval()
    alone = [tok.batch_decode(model.generate(torch.tensor(tok([s])["input_ids"]), **options),
                              skip_special_tokens=True)[0] for s in sources]
    assert got == alone and len(set(got)) > 1     # in the order of the sources, whatever the batching
    # Truncation to max_source_length reaches the model: a 3-token limit sees only the first 2 characters.
    cut = metrics.generate_texts(model, tok, [sources[1]], options, max_source_length=3, progress=False)
    assert cut == metrics.generate_texts(model, tok, ["a "], options, progress=False)
    assert sources_containing("batch_decode(") == ["summarize.py", "tokenizer.py"]   # the loop, the method
