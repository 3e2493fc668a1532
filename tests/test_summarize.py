"""The `Summarizer` Python API (pegasus_x.summarize) on the tiny checkpoint of conftest.py: batching, generation
options, truncation and chunking, streaming, bad inputs. Every summary is checked against ``oracle``."""

from __future__ import annotations

import io
import re
import time
import warnings

import pytest
import torch

from conftest import CHUNK, LIMIT, LONG, NEW, SHORT, chunked_oracle, sources_containing
from pegasus_x.cli import main
from pegasus_x.errors import CheckpointError, GenerationError, InputError
from pegasus_x.summarize import Summarizer, TextStreamer, decode_texts, pad_rows, summarize

def spy_on_generate(model, monkeypatch, stub: bool = False) -> list[tuple[list[list[int]], dict]]:
    """Record (unpadded input rows, options) of every generate call; with ``stub``, return "</s>" summaries
    instead of generating (for tests of the options alone)."""
    calls = []
    original = model.generate

    def spy(input_ids, attention_mask=None, **options):
        masks = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        rows = [row[mask.bool()].tolist() for row, mask in zip(input_ids, masks)]
        calls.append((rows, options))
        if stub:
            return torch.tensor([[0, 1]] * len(rows))
        return original(input_ids, attention_mask, **options)
    monkeypatch.setattr(model, "generate", spy)
    return calls


def test_summarizer_text_and_batches(checkpoint, oracle, model, monkeypatch):
    summarizer = Summarizer(checkpoint, device="cpu", batch_size=2, max_new_tokens=NEW)
    assert summarizer.max_input_tokens == LIMIT and summarizer.chunk_length() == CHUNK
    assert summarizer(SHORT[0]) == oracle(SHORT[0])
    texts = [SHORT[0], SHORT[2], "Short one.", SHORT[1]]
    calls = spy_on_generate(summarizer.model, monkeypatch)
    assert summarizer(texts) == [oracle(t) for t in texts]
    lengths = [[len(r) for r in rows] for rows, _ in calls]
    assert [len(x) for x in lengths] == [2, 2] and lengths[0][0] >= lengths[1][0]   # longest first
    assert sorted(n for batch in lengths for n in batch) == sorted(len(summarizer.tokenizer.encode(t)) for t in texts)
    assert summarize(SHORT[1], model=model, max_new_tokens=NEW) == oracle(SHORT[1])


def test_summarizer_generation_defaults(model, monkeypatch):
    calls = spy_on_generate(model, monkeypatch, stub=True)
    summarizer = Summarizer(model, num_beams=2, length_penalty=0.5)
    summarizer(SHORT[0], max_new_tokens=3)
    summarizer.run([SHORT[0]])
    assert calls[0][1] == {"num_beams": 2, "length_penalty": 0.5, "max_new_tokens": 3}
    # The length (and every unset option) is left to generate, which reads the checkpoint as transformers does.
    assert calls[1][1] == {"num_beams": 2, "length_penalty": 0.5}
    assert summarizer.generation_options(num_beams=1) == {"num_beams": 1, "length_penalty": 0.5}
    with pytest.raises(GenerationError, match="num_beam"):
        summarizer(SHORT[0], num_beam=3)
    with pytest.raises(GenerationError, match="min_new_tokens=5 is larger"):
        Summarizer(model, min_new_tokens=5, max_new_tokens=4)


def test_summarizer_truncates_or_chunks(model, oracle, tokenizer, monkeypatch):
    summarizer = Summarizer(model, max_new_tokens=NEW)
    dropped = len(tokenizer.encode(LONG)) - LIMIT
    with pytest.warns(UserWarning, match=f"dropped the last {dropped} tokens"):
        assert summarizer(LONG) == oracle(LONG)
    expected = chunked_oracle(oracle, tokenizer, LONG)
    calls = spy_on_generate(model, monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                          # chunked: nothing dropped
        (result,) = summarizer.run([LONG], chunked=True)
    assert result.text == expected
    assert result.dropped_tokens == 0 and result.chunks == len(calls[0][0]) and len(calls) == 2
    assert all(len(row) == CHUNK for row in calls[0][0][:-1]) and len(calls[1][0][0]) <= LIMIT
    # max_input_tokens below the model's limit: chunks shrink to a multiple of the block size within it.
    small = Summarizer(model, max_input_tokens=20, max_new_tokens=NEW)
    assert small.max_input_tokens == 20 and small.chunk_length() == 16


def test_summarizer_stream_fallback_tokenizer_and_bad_inputs(checkpoint, model, oracle, tmp_path):
    summarizer = Summarizer(model, max_new_tokens=NEW)
    sink = io.StringIO()
    results = summarizer.run(SHORT[:2], streamer=TextStreamer(summarizer.tokenizer, file=sink))
    assert sink.getvalue() == "".join(r.text + "\n" for r in results)
    assert [r.text for r in results] == [oracle(t) for t in SHORT[:2]]

    bare = tmp_path / "no-tokenizer"
    model.save_pretrained(bare)
    with pytest.warns(UserWarning, match="no tokenizer.json or spiece.model"):
        fallback = Summarizer(bare, device="cpu", max_new_tokens=NEW)
    assert fallback(SHORT[0]) == oracle(SHORT[0])

    for bad, message in ((b"bytes", "decode bytes first"), ([""], "text 0 is empty"), ([], "list is empty")):
        with pytest.raises(InputError, match=message):
            summarizer(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        Summarizer(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------------- chunking limits
@pytest.fixture(scope="module")
def summarizer(checkpoint) -> Summarizer:
    return Summarizer(checkpoint, device="cpu")


@pytest.mark.parametrize("limit, new, smallest", [(2, 6, 8), (2, 4, 6), (20, 16, 24), (15, 14, 16)])
def test_chunks_no_longer_than_a_summary_are_refused(summarizer, limit, new, smallest):
    def small_summarizer(limit: int) -> Summarizer:
        return Summarizer(summarizer.model, summarizer.tokenizer, max_input_tokens=limit, max_new_tokens=new)

    small = small_summarizer(limit)
    with pytest.raises(InputError, match=f"a chunk holds {small.chunk_length() - 1} tokens of text but a summary "
                                         f"may take {new}.*use max_input_tokens >= {smallest}"):
        small(LONG, chunked=True)
    assert small_summarizer(smallest).chunk_length() - 1 > new >= small_summarizer(smallest - 1).chunk_length() - 1


def test_chunking_needs_a_summary_shorter_than_the_models_chunk(summarizer):
    with pytest.raises(InputError, match="reads at most 44 tokens, so use a max_new_tokens below 39"):
        summarizer(LONG, chunked=True, max_new_tokens=39)


def test_chunked_command_refuses_a_limit_that_cannot_finish(checkpoint, tmp_path, capsys):
    (tmp_path / "long.txt").write_text(LONG)
    args = ["summarize", "--model", str(checkpoint), "--chunked", "--max-input-tokens", "2", "--max-new-tokens",
            "6", str(tmp_path / "long.txt")]
    start = time.perf_counter()
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "use max_input_tokens >= 8 (--max-input-tokens)" in err
    assert time.perf_counter() - start < 10


@pytest.mark.slow
def test_chunked_fallback_warning_advises_shorter_summaries(summarizer, checkpoint, tmp_path, capsys):
    # Three chunks (39 + 39 + 2 text tokens) summarized in exactly 38 tokens each: together longer than the text,
    # so chunking stops after one round and the joined summaries are truncated.
    text = LONG[:len(LONG) // 2]
    with pytest.warns(UserWarning) as caught:
        summarizer(text, chunked=True, min_new_tokens=38, max_new_tokens=38)
    (warning,) = caught
    assert re.fullmatch(r"the text: the summaries of its 3 chunks together were no shorter than the text, so "
                        r"chunking stopped and dropped the last \d+ tokens of those summaries; lower max_new_tokens "
                        r"well below the 39 text tokens of a chunk", str(warning.message)), warning.message
    (tmp_path / "long.txt").write_text(text)
    assert main(["summarize", "--model", str(checkpoint), "--device", "cpu", "--chunked", "--min-new-tokens", "38",
                 "--max-new-tokens", "38", str(tmp_path / "long.txt")]) == 0
    err = capsys.readouterr().err
    assert "--chunked" not in err and "lower --max-new-tokens well below the 39 text tokens" in err, err


def test_python_texts_with_a_lone_surrogate_are_refused(summarizer):
    with pytest.raises(InputError, match=r"text 1 holds the lone surrogate \\ud800 .* at character 2"):
        summarizer(["fine", "ab\ud800c"])


def test_padding_and_decoding_of_batches_have_one_owner(tokenizer):
    ids, mask = pad_rows([[5, 6, 1], [7, 1]], 0, torch.device("cpu"))
    assert ids.tolist() == [[5, 6, 1], [7, 1, 0]] and mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    hello = tokenizer.encode("Hello there.")
    out = torch.tensor([[0, *hello], [0, *tokenizer.encode(" spaced "), *[0] * (len(hello) - 2)]])
    assert decode_texts(tokenizer, out) == ["Hello there.", "spaced"]
    # Summarizer, evaluation and the server all pad and decode through these two.
    assert sources_containing("batch_decode(") == ["summarize.py", "tokenizer.py"]
    assert sources_containing("[pad] * (") == ["summarize.py"]

