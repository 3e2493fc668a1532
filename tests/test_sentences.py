"""The package's one sentence splitter (pegasus_x.sentences): abbreviations, lowercased text, and its users
(ROUGE-Lsum in metrics, GSG in pretraining) taking it rather than a copy."""

from __future__ import annotations

from pegasus_x import metrics, pretraining, sentences
from pegasus_x.metrics import sentence_per_line

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


def test_lowercased_text_splits_at_every_sentence_end_but_abbreviations():
    # Lowercased corpora (arXiv, PubMed) carry no case signal: a period before a lowercase word ends a sentence
    # there, but not after an abbreviation.
    assert sentences.split_sentences("dr. smith came. see fig. 3 below. it rose, e.g. twice.") == [
        "dr. smith came.", "see fig. 3 below.", "it rose, e.g. twice."]
    # In cased text a lowercase word after a period still means an abbreviation (the pretraining rule).
    assert sentences.split_sentences("It was approx. five hours. Then it ended.") == [
        "It was approx. five hours.", "Then it ended."]


def test_sentence_splitter_rules():
    text = ('Dr. Smith met J. R. Doe in the U.S. yesterday. "Was it fun?" she asked. It was approx. five hours '
            "(see Fig. 2). Prices rose 3.5 percent!\nA new line starts a sentence\nEven without a period. 2020 "
            "was odd. e.g. lowercase starts do not split. end")
    assert sentences.split_sentences(text) == [
        "Dr. Smith met J. R. Doe in the U.S. yesterday.", '"Was it fun?" she asked.',
        "It was approx. five hours (see Fig. 2).", "Prices rose 3.5 percent!", "A new line starts a sentence",
        "Even without a period.", "2020 was odd. e.g. lowercase starts do not split. end"]
    assert sentences.split_sentences("  \n\n ") == []
