"""Reading and checking `POST /v1/summarize` requests, without a server."""

from __future__ import annotations

import pytest

from pegasus_x.errors import RequestError
from pegasus_x.serve_requests import MAX_BEAMS, file_text, from_form, from_json, option_names
from pegasus_x.summarize import Summarizer


@pytest.fixture(scope="module")
def summarizer():
    return Summarizer(None, num_beams=2)


def test_json_request_merges_server_defaults(summarizer):
    req = from_json(b'{"text": "A text.", "max_new_tokens": 9, "stream": true}', summarizer, 1000)
    assert req.text == "A text." and req.stream is True
    assert req.options == {"num_beams": 2, "max_new_tokens": 9}


def test_form_values_are_json_literals(summarizer):
    req = from_form({"text": "4", "num_beams": "4", "early_stopping": "never", "stream": "false"}, None,
                    summarizer, 1000)
    assert req.text == "4"  # the text is never parsed
    assert req.options["num_beams"] == 4 and req.options["early_stopping"] == "never" and req.stream is False
    with pytest.raises(RequestError) as err:
        from_form({"text": "a", "length_penalty": "NaN"}, None, summarizer, 1000)
    assert err.value.field == "length_penalty" and err.value.status == 422


def test_option_limits_and_server_decided_fields(summarizer):
    assert "num_beams" in option_names() and "pad_token_id" not in option_names()
    for fields, field in (({"text": "a", "num_beams": MAX_BEAMS + 1}, "num_beams"),
                          ({"text": "a", "streamer": 1}, "streamer"),
                          ({"text": "a", "num_return_sequences": 2}, "num_return_sequences")):
        with pytest.raises(RequestError) as err:
            from_form({k: str(v) for k, v in fields.items()}, None, summarizer, 1000)
        assert err.value.field == field


def test_file_kinds():
    assert file_text("a.md", "", b"# Title\n\nSome **bold** words.", 1000).split() == ["Title", "Some", "bold",
                                                                                      "words."]
    assert file_text("a.txt", "text/plain", "caf\u00e9".encode(), 1000) == "caf\u00e9"
    with pytest.raises(RequestError) as err:
        file_text("a.txt", "text/plain", b"x" * 1001, 1000)
    assert err.value.status == 413 and err.value.field == "file"
    with pytest.raises(RequestError) as err:  # PDF by its magic bytes, whatever its name
        file_text("upload", "", b"%PDF-1.4 not really", 1000)
    assert "PDF" in str(err.value) and err.value.field == "file"
