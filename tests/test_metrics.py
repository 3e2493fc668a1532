"""ROUGE-Lsum as the papers compute it: one sentence per line, split by the package's one splitter."""

from __future__ import annotations

import pytest

from pegasus_x import sentences
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
