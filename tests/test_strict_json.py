"""pegasus_x.strict_json: loads() refuses what json.loads lets through (and so does every reader of records:
documents to summarize, training pairs, pretraining documents); read_object() is the one reader of model JSON files."""

from __future__ import annotations

import json
import os
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pegasus_x import CheckpointError
from pegasus_x import strict_json
from pegasus_x.cli import main
from pegasus_x.errors import DataError
from pegasus_x.pretraining import read_documents
from pegasus_x.strict_json import MODEL_FILE_LIMIT, loads, read_object
from pegasus_x.training.data import load_pairs


def _file(tmp_path, content: str | bytes):
    path = tmp_path / "config.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def test_reads_an_object(tmp_path):
    assert read_object(_file(tmp_path, '{"a": [1, {"b": null}]}'), CheckpointError) == {"a": [1, {"b": None}]}


@pytest.mark.parametrize("text, phrase", [
    ("[1]", "not an array"), ('"x"', "not a string"), ("3", "not a number"), ("true", "not a boolean"),
    ("null", "not null"), ("{oops", "not valid JSON (Expecting property name"), ('{"a": NaN}', "NaN is not a JSON"),
    ('{"a": -Infinity}', "-Infinity is not"), ('{"a": "\\ud800"}', "lone surrogate \\ud800"),
    ("[" * 10**5 + "]" * 10**5, "nested more deeply"), ('{"a": 1', "not valid JSON"),
])
def test_refuses_with_the_file_name(tmp_path, text, phrase):
    path = _file(tmp_path, text)
    with pytest.raises(CheckpointError) as info:
        read_object(path, CheckpointError, fix="re-download it")
    message = str(info.value)
    assert str(path) in message and phrase in message and "\n" not in message, message


def test_not_utf8(tmp_path):
    with pytest.raises(CheckpointError, match="not UTF-8 text"):
        read_object(_file(tmp_path, b'{"a": "\xff"}'), CheckpointError)


def test_size_limit_is_checked_before_parsing(tmp_path):
    path = _file(tmp_path, "{}" + " " * MODEL_FILE_LIMIT)
    with pytest.raises(CheckpointError, match=f"larger than {MODEL_FILE_LIMIT:,} bytes"):
        read_object(path, CheckpointError)
    assert read_object(_file(tmp_path, '{"a": 1}'), CheckpointError, limit=8) == {"a": 1}
    with pytest.raises(CheckpointError, match="larger than 7 bytes"):
        read_object(path.with_name("config.json"), CheckpointError, limit=7)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(CheckpointError, match="cannot read .*No such file"):
        read_object(tmp_path / "none.json", CheckpointError)
    with pytest.raises(CheckpointError, match="is not a regular file"):
        read_object(tmp_path, CheckpointError)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_refused_without_blocking(tmp_path):
    """Nothing writes to this FIFO: opening it for a plain read would wait forever."""
    path = tmp_path / "config.json"
    os.mkfifo(path)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="not a regular file"):
        read_object(path, CheckpointError)
    assert time.perf_counter() - start < 1.0


def test_error_type_is_the_callers(tmp_path):
    from pegasus_x import TokenizerError

    with pytest.raises(TokenizerError):
        read_object(_file(tmp_path, "[]"), TokenizerError)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                    | st.text(), lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner,
                                                                                              max_size=4), max_leaves=20)


@settings(max_examples=100, deadline=None)
@given(value=JSON)
def test_property_objects_round_trip_and_nothing_else_is_accepted(tmp_path_factory, value):
    path = _file(tmp_path_factory.mktemp("j"), json.dumps(value))
    if isinstance(value, dict):
        assert read_object(path, CheckpointError) == value == loads(json.dumps(value))
    else:
        with pytest.raises(CheckpointError, match="must hold a JSON object"):
            read_object(path, CheckpointError)


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
