"""Gap-sentence generation: splitting, ROUGE-1 scoring (checked against rouge-score), selection, masking, CLI."""

from __future__ import annotations

import argparse
import json
import math
import sys
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer

import pegasus_x
import pegasus_x.training
from pegasus_x import ConfigError, DataError
from pegasus_x.pretraining import (GSGOptions, make_gsg_example, register, rouge1_f1, sentence_scores,
                                   write_gsg_jsonl)
from pegasus_x.sentences import split_sentences

SCORER = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "far", "away", "big", "red", "sun", "rose", "again", "2020"]


def reference_f1(prediction: str, reference: str) -> float:
    return SCORER.score(reference, prediction)["rouge1"].fmeasure


@st.composite
def documents(draw, min_sentences=2, max_sentences=25):
    """(sentences, separators, document): capitalised sentences of common words, joined by spaces or newlines."""
    n = draw(st.integers(min_sentences, max_sentences))
    sentences = []
    for _ in range(n):
        words = draw(st.lists(st.sampled_from(WORDS), min_size=0, max_size=8))
        first = draw(st.sampled_from(["The", "Some", "Cats", "Dogs", "It", "Red"]))  # no initials like "A."
        sentences.append(" ".join([first, *words]) + draw(st.sampled_from([".", "!", "?"])))
    seps = draw(st.lists(st.sampled_from([" ", "  ", "\n", " \n"]), min_size=n - 1, max_size=n - 1))
    doc = sentences[0] + "".join(sep + s for sep, s in zip(seps, sentences[1:]))
    return sentences, seps, doc


# ---------------------------------------------------------------------------------------------------- scoring
def test_rouge1_f1_matches_rouge_score():
    pairs = [("The cat sat on the mat.", "A cat was sitting on a mat, the cat said."),
             ("Revenue grew 12% in 2020 (to $3.5bn).", "In 2020, revenue grew by 12 percent to 3.5bn dollars."),
             ("the the the", "the cat"), ("Nothing shared here", "completely different words"),
             ("Ünïcode café naïve", "cafe naive unicode"), ("", "some words"), ("UPPER lower", "upper LOWER")]
    for prediction, reference in pairs:
        assert rouge1_f1(prediction, reference) == pytest.approx(reference_f1(prediction, reference), abs=1e-12)
    assert rouge1_f1("the cat", "the dog") == pytest.approx(0.5)


@settings(max_examples=60, deadline=None)
@given(documents())
def test_sentence_scores_are_rouge1_against_the_rest(data):
    sentences, _, _ = data
    scores = sentence_scores(sentences)
    for i, s in enumerate(sentences):
        rest = " ".join(sentences[:i] + sentences[i + 1:])
        assert scores[i] == pytest.approx(reference_f1(s, rest), abs=1e-12)


# ---------------------------------------------------------------------------------------------------- splitting
@settings(max_examples=100, deadline=None)
@given(documents(min_sentences=1))
def test_splitter_recovers_generated_sentences(data):
    sentences, _, doc = data
    assert split_sentences(doc) == sentences


# ---------------------------------------------------------------------------------------------------- selection
@settings(max_examples=200, deadline=None)
@given(documents(), st.floats(0.05, 0.95), st.integers(0, 2 ** 32 - 1), st.floats(0.0, 1.0))
def test_gsg_example_properties(data, ratio, seed, mask_prob):
    sentences, seps, doc = data
    n = len(sentences)
    options = GSGOptions(min_ratio=ratio, max_ratio=ratio, mask_prob=mask_prob)
    ex = make_gsg_example(doc, seed, options)

    # count: round half up, clipped to [1, n-1]
    assert len(ex.selected) == min(max(math.floor(ratio * n + 0.5), 1), n - 1)
    assert ex.selected == sorted(set(ex.selected)) and all(0 <= i < n for i in ex.selected)
    assert set(ex.masked) <= set(ex.selected)
    # the best sentences by (independently computed) ROUGE-1 against the rest; ties go to the earlier one
    ref = [reference_f1(s, " ".join(sentences[:i] + sentences[i + 1:])) for i, s in enumerate(sentences)]
    for s in ex.selected:
        for u in set(range(n)) - set(ex.selected):
            assert ref[s] > ref[u] + 1e-12 or (abs(ref[s] - ref[u]) <= 1e-12 and s < u)
    # masks exactly where chosen to be masked, the rest of the document untouched (own separators kept)
    pieces = ["<mask_1>" if i in ex.masked else s for i, s in enumerate(sentences)]
    assert ex.source == (pieces[0] + "".join(sep + p for sep, p in zip(seps, pieces[1:]))).strip()
    assert ex.target == " ".join(sentences[i] for i in ex.selected)
    assert make_gsg_example(doc, seed, options) == ex


@settings(max_examples=50, deadline=None)
@given(documents(min_sentences=3), st.integers(0, 10 ** 6))
def test_ratio_range_bounds_the_count(data, seed):
    sentences, _, doc = data
    n = len(sentences)
    ex = make_gsg_example(doc, seed)
    low, high = (min(max(math.floor(r * n + 0.5), 1), n - 1) for r in (0.15, 0.45))
    assert low <= len(ex.selected) <= high


@pytest.mark.slow
def test_mask_probability_and_ratio_distribution_over_seeds():
    doc = " ".join(f"Sentence {i} talks about {' '.join(WORDS[i % 7: i % 7 + 4])}." for i in range(20))
    examples = [make_gsg_example(doc, seed) for seed in range(2000)]
    selected = sum(len(e.selected) for e in examples)
    masked = sum(len(e.masked) for e in examples)
    assert 0.88 < masked / selected < 0.92                     # p = 0.9, ~12,000 draws: sd ≈ 0.003
    counts = [len(e.selected) for e in examples]
    assert min(counts) == 3 and max(counts) == 9               # round(0.15·20) … round(0.45·20)
    assert abs(sum(counts) / len(counts) - 6.0) < 0.15         # ratio uniform on [0.15, 0.45] → mean 6
    assert len({tuple(e.masked) for e in examples}) > 50       # the seed really drives the choices
    # a kept (unmasked) selected sentence stays verbatim in the source
    kept = next(e for e in examples if set(e.selected) - set(e.masked))
    i = (set(kept.selected) - set(kept.masked)).pop()
    assert split_sentences(doc)[i] in kept.source


def test_invalid_inputs_raise_our_errors():
    with pytest.raises(DataError, match="at least two sentences"):
        make_gsg_example("Only one sentence here.", 0)
    for bad in (dict(min_ratio=0.5, max_ratio=0.2), dict(min_ratio=0.0), dict(max_ratio=1.0),
                dict(mask_prob=1.5), dict(mask_token="")):
        with pytest.raises(ConfigError):
            GSGOptions(**bad)


# ---------------------------------------------------------------------------------------------------- corpus + CLI
def test_write_gsg_jsonl_is_per_document_deterministic(tmp_path):
    from pegasus_x.training.data import load_pairs

    docs = ["One sentence only.", "First point. Second point. Third point is different.",
            "Cats sit. Dogs run. Cats run. Dogs sit."]
    stats = write_gsg_jsonl(docs, tmp_path / "a.jsonl", seed=5)
    assert (stats.documents, stats.examples, stats.skipped) == (3, 2, 1)
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all("<mask_1>" in r["source"] or r["target"] in r["source"] for r in rows)
    assert len(load_pairs(tmp_path / "a.jsonl")) == 2
    write_gsg_jsonl(docs + ["More text. And more text."], tmp_path / "b.jsonl", seed=5)
    assert (tmp_path / "b.jsonl").read_text().startswith((tmp_path / "a.jsonl").read_text())
    with pytest.raises(DataError, match="two or more sentences"):
        write_gsg_jsonl(["Short."], tmp_path / "c.jsonl")
    assert not (tmp_path / "c.jsonl").exists()


def test_pretrain_command_hands_pairs_to_the_train_subcommand(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake_register(subparsers):
        p = subparsers.add_parser("train")
        p.add_argument("--train", required=True)
        p.add_argument("--steps", type=int, default=1)

        def run(args):
            seen["rows"] = [json.loads(x) for x in open(args.train, encoding="utf-8")]
            seen["steps"] = args.steps
            return 0

        p.set_defaults(func=run)

    fake = types.SimpleNamespace(register=fake_register)
    monkeypatch.setitem(sys.modules, "pegasus_x.training.commands", fake)
    monkeypatch.setattr(pegasus_x.training, "commands", fake, raising=False)   # `from .training import commands`
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in [
        "Alpha beta. Gamma delta. Alpha gamma.", "Lonely.", "Sun rises. Sun sets. Moon rises."]) + "\n")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["pretrain", "--data", str(data), "--mask-prob", "1.0", "--", "--steps", "7"])
    assert args.func(args) == 0
    assert seen["steps"] == 7 and len(seen["rows"]) == 2
    assert all("<mask_1>" in row["source"] and row["target"] for row in seen["rows"])
    assert "2 examples from 3 documents (1 with fewer than two sentences skipped)" in capsys.readouterr().out


def test_pretrain_arguments_parse_with_the_real_train_command(tmp_path, monkeypatch):
    """The hand-off contract with pegasus_x.training.commands: `train --train PAIRS TRAIN_OPTIONS…` reaches its run function."""
    from pegasus_x.training import commands as train
    seen = {}

    def fake_run_train(args):
        seen["options"] = train.options_from_args(args)
        seen["rows"] = (tmp_path / "kept.jsonl").read_text().splitlines()
        return 0

    monkeypatch.setattr(train, "run_train", fake_run_train)
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"body": "Sun rises. Sun sets. Moon rises. Stars shine."}) + "\n")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["pretrain", "--data", str(data), "--text-column", "body", "--pairs-out",
                              str(tmp_path / "kept.jsonl"), "--", "--model", "tiny", "--output-dir",
                              str(tmp_path / "run"), "--max-steps", "3", "--max-source-length", "4096"])
    assert args.func(args) == 0
    assert len(seen["rows"]) == 1 and (tmp_path / "kept.jsonl").is_file()
    options = seen["options"]
    assert str(options.train) == str(tmp_path / "kept.jsonl") and options.max_steps == 3
    assert options.max_source_length == 4096 and options.model == "tiny"


def test_mask_sentence_is_one_token_for_the_pegasus_tokenizer():
    from pegasus_x.tokenizer import PegasusTokenizer

    tok = PegasusTokenizer.pegasus()
    ex = make_gsg_example("Banks must plan. To ensure a smooth flow of bank resolutions. Regulators agree.", 1,
                          GSGOptions(mask_prob=1.0))
    ids = tok.encode(ex.source)
    assert ids.count(2) == len(ex.masked) >= 1                 # id 2 = <mask_1> (REFERENCE.md)
    assert tok.decode(ids, skip_special_tokens=False).count("<mask_1>") == len(ex.masked)
