"""ROUGE-Lsum as the papers compute it: one sentence per line, split by the package's one splitter."""

from __future__ import annotations

import pytest

from pegasus_x import metrics, pretraining, sentences
from pegasus_x.metrics import rouge_scores, sentence_per_line

rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer", reason="install the test extras: pip install -e '.[test]'")

REFERENCE = ("Dr. Smith measured the flow, e.g. in the main pipe. See Fig. 3 for the result. "
             "The pressure rose by 4 bar.\nJ. Doe repeated it.")
PREDICTION = "Result: see Fig. 3 for the flow Dr. Smith measured. The pressure rose, e.g. by 4 bar."


def test_abbreviations_do_not_end_sentences():
    assert sentence_per_line(REFERENCE) == ("Dr. Smith measured the flow, e.g. in the main pipe.\n"
                                            "See Fig. 3 for the result.\nThe pressure rose by 4 bar.\n"
                                            "J. Doe repeated it.")
    assert sentence_per_line(PREDICTION).splitlines() == [
        "Result: see Fig. 3 for the flow Dr. Smith measured.", "The pressure rose, e.g. by 4 bar."]


def test_one_splitter_for_the_package():
    assert metrics.split_sentences is sentences.split_sentences
    assert pretraining.sentence_spans is sentences.sentence_spans


def test_lsum_equals_rouge_score_on_the_split_text():
    scorer = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=True)
    split = "\n".join(sentences.split_sentences(REFERENCE)), "\n".join(sentences.split_sentences(PREDICTION))
    expected = 100.0 * scorer.score(*split)["rougeLsum"].fmeasure
    assert rouge_scores([PREDICTION], [REFERENCE])["rougeLsum"] == pytest.approx(expected, abs=1e-12)
    # The split matters: on the unsplit text (one "sentence") Lsum is plain ROUGE-L, a different number.
    assert 100.0 * scorer.score(REFERENCE, PREDICTION)["rougeLsum"].fmeasure != pytest.approx(expected)


def test_lowercased_text_splits_at_every_sentence_end_but_abbreviations():
    # Lowercased corpora (arXiv, PubMed) carry no case signal: a period before a lowercase word ends a sentence
    # there, but not after an abbreviation.
    assert sentences.split_sentences("dr. smith came. see fig. 3 below. it rose, e.g. twice.") == [
        "dr. smith came.", "see fig. 3 below.", "it rose, e.g. twice."]
    # In cased text a lowercase word after a period still means an abbreviation (the pretraining rule).
    assert sentences.split_sentences("It was approx. five hours. Then it ended.") == [
        "It was approx. five hours.", "Then it ended."]
