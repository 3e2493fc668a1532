"""JSON that parses but nothing can use (pegasus_x.strict_json): refused by loads() and by every reader of
records (documents to summarize, training pairs, pretraining documents) with the file and line."""

from __future__ import annotations

import json
import re

import pytest

from pegasus_x import strict_json
from pegasus_x.cli import main
from pegasus_x.errors import DataError
from pegasus_x.pretraining import read_documents
from pegasus_x.training.data import load_pairs

BAD_JSON = {  # line 2 of a corpus -> the error's words
    "lone surrogate in the text": ('{"text": "a\\ud800b"}', "a string holds the lone surrogate \\ud800"),
    "lone surrogate in the id": ('{"text": "ok", "id": ["x", "\\udfff"]}', "a string holds the lone surrogate \\udfff"),
    "NaN id": ('{"text": "ok", "id": NaN}', "NaN is not a JSON value"),
    "Infinity": ('{"text": "ok", "score": -Infinity}', "-Infinity is not a JSON value"),
    "deep nesting": ('{"text": "ok", "id": ' + "[" * 100000 + "]" * 100000 + "}", "nested more deeply"),
}


@pytest.mark.parametrize("name", sorted(BAD_JSON))
def test_jsonl_values_nothing_can_use_are_refused(name, tmp_path, capsys):
    line, message = BAD_JSON[name]
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text('{"text": "fine", "id": "a\\ud83d\\ude00b"}\n' + line + "\n")  # a surrogate *pair* is fine
    assert main(["summarize", "--model", "/nonexistent-model", "--input", str(corpus)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and f"docs.jsonl:2: {message}" in err, err


@pytest.mark.parametrize("name", sorted(BAD_JSON))
def test_loads_refuses_what_json_loads_lets_through(name):
    text = BAD_JSON[name][0]
    if name != "deep nesting":                               # that one makes json.loads raise RecursionError
        json.loads(text)                                     # the standard parser accepts the others
    with pytest.raises(ValueError, match=re.escape(BAD_JSON[name][1])) as info:
        strict_json.loads(text)
    assert not isinstance(info.value, json.JSONDecodeError)  # callers tell "not JSON" from "JSON we refuse"


def test_loads_keeps_what_json_loads_returns():
    for text in ('{"text": "a\\ud83d\\ude00b", "n": [1, 2.5, null, true]}', '"\\u00e9"', "[]", "0"):
        assert strict_json.loads(text) == json.loads(text)
    with pytest.raises(json.JSONDecodeError):
        strict_json.loads("{oops")


@pytest.mark.parametrize("name", sorted(BAD_JSON))
def test_training_data_values_nothing_can_use_are_refused(name, tmp_path):
    line, message = BAD_JSON[name]
    line = line.replace('"text"', '"source": "s", "target"')
    (tmp_path / "train.jsonl").write_text('{"source": "s", "target": "t"}\n' + line + "\n")
    with pytest.raises(DataError, match=re.escape(f"train.jsonl line 2: {message}")):
        load_pairs(tmp_path / "train.jsonl")
    (tmp_path / "docs.json").write_text("[" + line.replace('"target"', '"text"') + "]")
    with pytest.raises(DataError, match=re.escape(f"docs.json: {message}")):
        read_documents(tmp_path / "docs.json")
