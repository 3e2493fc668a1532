"""`pegasus-x` end to end (subprocesses on a tiny random checkpoint) and the `Summarizer` Python API.

The oracle for every summary is the model's own `generate` called directly, one text at a time, on ids the test
builds from the tokenizer: so these tests check the plumbing (reading, truncation, chunking, batching, ordering,
sharding, output), not the model.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from pegasus_x import PegasusXConfig, PegasusXForConditionalGeneration, __version__
from pegasus_x.cli import main
from pegasus_x.markdown import markdown_to_text
from pegasus_x.errors import CheckpointError, GenerationError, InputError
from pegasus_x.summarize import Summarizer, TextStreamer, summarize
from pegasus_x.tokenizer import PegasusTokenizer

LIMIT = 44        # config.max_position_embeddings of the tiny model: the input limit (tokenizer says 16384)
BLOCK = 8
CHUNK = 40        # largest multiple of BLOCK within LIMIT
NEW = 6           # --max-new-tokens used throughout
SHORT = ["The quick brown fox jumps over the lazy dog near the river bank.",
         "Stock markets fell sharply on Monday after the inflation report.",
         "A new species of frog was found in the rainforest of Peru by a team of biologists."]
LONG = " ".join(f"Sentence {i} tells of rivers, mountains and the harvest of year {1900 + i}." for i in range(12))
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tokenizer() -> PegasusTokenizer:
    return PegasusTokenizer.pegasus()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer) -> Path:
    """A 3M-parameter random PEGASUS-X (d_model 32, full vocabulary) with tokenizer files and the hub's
    generation_config quirk (max_length 16384). init_std 1.0 makes greedy outputs depend on the input."""
    torch.manual_seed(0)
    config = PegasusXConfig.tiny(d_model=32, encoder_attention_heads=2, decoder_attention_heads=2,
                                 encoder_ffn_dim=64, decoder_ffn_dim=64, num_global_tokens=4, block_size=BLOCK,
                                 max_position_embeddings=LIMIT, init_std=1.0)
    model = PegasusXForConditionalGeneration(config)
    model.generation_config = {"num_beams": 1, "max_length": 16384, "decoder_start_token_id": 0,
                               "eos_token_id": 1, "pad_token_id": 0}
    folder = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(checkpoint) -> PegasusXForConditionalGeneration:
    return PegasusXForConditionalGeneration.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def oracle(model, tokenizer):
    """summary(ids or text) by calling generate directly on one input, truncated to LIMIT keeping </s>."""
    def run(source: str | list[int], **options) -> str:
        ids = tokenizer.encode(source) if isinstance(source, str) else list(source)
        if len(ids) > LIMIT:
            ids = ids[:LIMIT - 1] + ids[-1:]
        options = {"max_new_tokens": NEW, **options}
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), **options)
        return tokenizer.decode(out[0], skip_special_tokens=True).strip()
    return run


def cli(*args: str, stdin: str | bytes | None = None, env: dict | None = None, cwd: Path | None = None,
        module: tuple[str, ...] = ("-m", "pegasus_x"), gpu: bool = False) -> subprocess.CompletedProcess:
    """Run a command in a fresh interpreter; CPU only (the oracles run fp32 on CPU) unless ``gpu``."""
    data = stdin.encode() if isinstance(stdin, str) else stdin
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({} if gpu else {"CUDA_VISIBLE_DEVICES": ""}), **(env or {})}
    return subprocess.run([sys.executable, *module, *args], input=data, capture_output=True, timeout=120,
                          env=env, cwd=cwd, stdin=None if data is not None else subprocess.DEVNULL)


def decoded(proc: subprocess.CompletedProcess) -> tuple[str, str]:
    return proc.stdout.decode(), proc.stderr.decode()


def write(folder: Path, name: str, text: str | bytes) -> Path:
    path = folder / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


# ---------------------------------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_summarize_stdin_and_files(checkpoint, oracle, tmp_path):
    # Piped stdin without PATH: the summary alone on stdout, nothing on stderr (no progress bar off a TTY).
    proc = cli("summarize", "--model", str(checkpoint), "--max-new-tokens", str(NEW), stdin=SHORT[1])
    out, err = decoded(proc)
    assert proc.returncode == 0 and err == "", err
    assert out == oracle(SHORT[1]) + "\n"
    # A file and '-' together: a header per input, input order kept.
    write(tmp_path, "a.txt", SHORT[0])
    proc = cli("summarize", "--model", str(checkpoint), "--max-new-tokens", str(NEW), "a.txt", "-",
               stdin=SHORT[2], cwd=tmp_path)
    assert decoded(proc)[0] == (f"==> a.txt <==\n{oracle(SHORT[0])}\n"
                                f"==> <stdin> <==\n{oracle(SHORT[2])}\n")


@pytest.mark.slow
def test_several_files_to_jsonl_with_truncation_warning(checkpoint, oracle, tokenizer, tmp_path):
    markdown = ("# Harvest report\n\nSee [the annual report](http://example.org/r) for **all** details.\n\n"
                "```\nprint('code is dropped')\n```\n")
    plain = "Harvest report\n\nSee the annual report for all details."
    paths = [write(tmp_path, "a.txt", SHORT[0]), write(tmp_path, "b.md", markdown),
             write(tmp_path, "long.txt", LONG), write(tmp_path, "c.txt", SHORT[2])]
    out_file = tmp_path / "out.jsonl"
    proc = cli("summarize", "--model", str(checkpoint), "--max-new-tokens", str(NEW), "--batch-size", "2",
               "--output", str(out_file), *map(str, paths))
    out, err = decoded(proc)
    assert proc.returncode == 0, err
    assert out == ""
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    sources = [SHORT[0], plain, LONG, SHORT[2]]
    assert [r["path"] for r in records] == [str(p) for p in paths]
    assert [r["summary"] for r in records] == [oracle(s) for s in sources]
    assert [r["input_tokens"] for r in records] == [len(tokenizer.encode(s)) for s in sources]
    dropped = len(tokenizer.encode(LONG)) - LIMIT
    assert dropped > 0 and [r["dropped_tokens"] for r in records] == [0, 0, dropped, 0]
    assert all(isinstance(r["seconds"], float) and r["seconds"] >= 0 for r in records)
    warning_lines = [line for line in err.splitlines() if "warning" in line]
    assert warning_lines == [f"pegasus-x: warning: {paths[2]}: {dropped + LIMIT} tokens but the model reads at "
                             f"most {LIMIT}; dropped the last {dropped} tokens (use --chunked to summarize all "
                             "of it)"]


def chunked_oracle(oracle, tokenizer, text: str) -> str:
    """The spec of --chunked: block-aligned chunks of CHUNK tokens (</s> included), then the joined summaries."""
    body = tokenizer.encode(text)[:-1]
    pieces = [body[i:i + CHUNK - 1] + [1] for i in range(0, len(body), CHUNK - 1)]
    assert len(pieces) >= 3 and all(len(p) == CHUNK for p in pieces[:-1])
    joined = tokenizer.encode("\n".join(oracle(p) for p in pieces))
    assert len(joined) <= LIMIT  # one round is enough for this text
    return oracle(joined)


@pytest.mark.slow
def test_chunked_and_stream(checkpoint, oracle, tokenizer, tmp_path):
    write(tmp_path, "long.txt", LONG)
    write(tmp_path, "a.txt", SHORT[1])
    proc = cli("summarize", "--model", str(checkpoint), "--max-new-tokens", str(NEW), "--chunked", "--stream",
               "long.txt", "a.txt", cwd=tmp_path)
    out, err = decoded(proc)
    assert proc.returncode == 0 and err == "", err        # nothing dropped, so no warning
    assert out == (f"==> long.txt <==\n{chunked_oracle(oracle, tokenizer, LONG)}\n"
                   f"==> a.txt <==\n{oracle(SHORT[1])}\n")


@pytest.mark.slow
def test_info(checkpoint, model):
    proc = cli("info", str(checkpoint))
    out, err = decoded(proc)
    assert proc.returncode == 0, err
    assert f"parameters  {model.num_parameters():,} (F32)" in out     # counted from headers, tied embedding once
    assert "d_model 32, 2+2 layers, 2 heads, ffn 64" in out and f"block {BLOCK}, 4 global tokens" in out
    size = (checkpoint / "model.safetensors").stat().st_size
    assert any(line.split()[:1] == ["model.safetensors"] and f"{size / 1e6:.1f} MB" in line
               for line in out.splitlines())
    assert "tokenizer.json" in out and "generation_config.json" in out


@pytest.mark.slow
def test_errors_end_to_end(checkpoint, tmp_path):
    """Through a real process: exit status 2, one line on stderr, no traceback, the old --output untouched."""
    out_file = write(tmp_path, "out.jsonl", "old\n")
    write(tmp_path, "a.txt", SHORT[0])
    cases = [
        (["summarize", "--model", "google/no-such-model-here", "a.txt"], "could not download 'google/no-such"),
        (["summarize", "--model", str(checkpoint), "--min-new-tokens", "9", "--max-new-tokens", "3", "a.txt"],
         "min_new_tokens=9 is larger than max_new_tokens=3"),
    ]
    for args, message in cases:
        proc = cli(*args, "--output", str(out_file), env={"HF_HUB_OFFLINE": "1"}, cwd=tmp_path)
        out, err = decoded(proc)
        assert proc.returncode == 2, (args, err)
        assert err.count("\n") == 1 and err.startswith("pegasus-x: error: ") and message in err, err
        assert out == "" and out_file.read_text() == "old\n"


# The same checks in-process (fast): main() returns 2 and prints one line.
ERRORS = [
    (lambda d: [str(d / "missing.txt")], "missing.txt: no such file"),
    (lambda d: [str(d)], "is a directory"),
    (lambda d: [str(write(d, "bin.txt", b"abc\x00\x01def"))], "is a binary file"),
    (lambda d: [str(write(d, "latin.txt", "café au lait".encode("latin-1")))], "is not UTF-8 text"),
    (lambda d: [str(write(d, "blank.txt", " \n\t\n"))], "is empty"),
    (lambda d: ["--input", str(write(d, "bad.jsonl", '{"text": "ok"}\n{oops\n'))], "bad.jsonl:2: not valid JSON"),
    (lambda d: ["--input", str(write(d, "f.jsonl", '{"body": "x"}\n'))], "no string field 'text' (found: body)"),
    (lambda d: ["--input", str(write(d, "a.jsonl", '{"text": "x"}\n')), str(write(d, "a.txt", "y"))],
     "either PATHs or --input"),
    (lambda d: ["--model", str(d / "nowhere"), str(write(d, "a.txt", "y"))], "does not exist"),
    (lambda d: ["--device", "cuda:0" if not torch.cuda.is_available() else "tpu", str(write(d, "a.txt", "y"))],
     "device"),
    (lambda d: ["--max-input-tokens", "1", str(write(d, "a.txt", "y"))], "max_input_tokens must be an integer >= 2"),
    (lambda d: ["--output", str(d / "no" / "out.jsonl"), str(write(d, "a.txt", "y"))], "does not exist"),
]


@pytest.mark.parametrize("make_args, message", ERRORS)
def test_user_errors_in_process(make_args, message, checkpoint, tmp_path, capsys):
    args = make_args(tmp_path)
    model = [] if "--model" in args else ["--model", str(checkpoint)]
    assert main(["summarize", *model, *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("pegasus-x: error: ") and message in err, err


def test_version_empty_stdin_bad_flags_and_the_demo_model(checkpoint, tmp_path, capsys, monkeypatch):
    assert main(["--version"]) == 0 and capsys.readouterr().out == f"pegasus-x {__version__}\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"   \n")))
    assert main(["summarize", "--model", str(checkpoint)]) == 2
    assert capsys.readouterr().err == "pegasus-x: error: stdin is empty; there is nothing to summarize\n"

    for flags, message in ((["--num-beams", "0"], "argument --num-beams: must be a positive integer"),
                           (["--dtype", "fp16"], "argument --dtype: invalid choice"),
                           (["--batch-size", "x"], "argument --batch-size: must be an integer")):
        assert main(["summarize", *flags, "a.txt"]) == 2
        err = capsys.readouterr().err
        assert "pegasus-x summarize: error: " + message in err and "Traceback" not in err

    write(tmp_path, "a.txt", SHORT[0])
    monkeypatch.chdir(tmp_path)
    assert main(["summarize", "--max-new-tokens", "2", "a.txt"]) == 0       # no --model: the bundled demo model
    assert capsys.readouterr().out.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_ranks_equals_single_process(checkpoint, oracle, tmp_path):
    texts = SHORT + [LONG[:200], "Rain fell all night over the quiet town.", SHORT[0][::-1]]
    with (tmp_path / "docs.jsonl").open("w") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"body": text, **({"id": f"doc-{i}"} if i % 2 else {})}) + "\n")
    common = ["summarize", "--model", str(checkpoint), "--max-new-tokens", str(NEW), "--batch-size", "1",
              "--input", "docs.jsonl", "--text-field", "body", "--device", "cpu"]
    single = cli(*common, "--output", "single.jsonl", cwd=tmp_path)
    assert single.returncode == 0, decoded(single)[1]
    ranks = cli("--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
                "-m", "pegasus_x", *common, "--output", "dist.jsonl", cwd=tmp_path,
                module=("-m", "torch.distributed.run"))
    assert ranks.returncode == 0, decoded(ranks)[1]

    def load(name: str) -> list[dict]:
        records = [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "seconds"} for r in records]

    assert load("dist.jsonl") == load("single.jsonl")
    records = load("single.jsonl")
    assert [r["index"] for r in records] == list(range(len(texts)))
    assert [r.get("id") for r in records] == [f"doc-{i}" if i % 2 else None for i in range(len(texts))]
    assert [r["summary"] for r in records] == [oracle(t) for t in texts]


# ---------------------------------------------------------------------------------------------------- Python API
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run on a machine with one")
def test_cuda_defaults_to_bf16(checkpoint, tokenizer, tmp_path):
    summarizer = Summarizer(checkpoint, max_new_tokens=NEW)
    assert summarizer.device.type == "cuda" and summarizer.model.dtype == torch.bfloat16
    gpu = PegasusXForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.bfloat16, device="cuda")
    with torch.inference_mode():
        ids = torch.tensor([tokenizer.encode(SHORT[0])], device="cuda")
        expected = tokenizer.decode(gpu.generate(ids, max_new_tokens=NEW)[0].cpu(), skip_special_tokens=True).strip()
    assert summarizer(SHORT[0]) == expected
    write(tmp_path, "a.txt", SHORT[0])
    proc = cli("summarize", "--model", str(checkpoint), "--max-new-tokens", str(NEW), "a.txt", cwd=tmp_path,
               gpu=True)
    assert proc.returncode == 0 and decoded(proc)[0] == expected + "\n", decoded(proc)[1]


def test_markdown_to_text():
    text = ("## Title\n> quoted *word* and `code`\n- item one\n1. first\n![a chart](c.png) [link](u) "
            "snake_case_name 2*3*4\n~~~\nhidden\n~~~\n<!-- note -->end")
    assert markdown_to_text(text) == ("Title\nquoted word and code\nitem one\nfirst\na chart link "
                                      "snake_case_name 2*3*4\n\nend")
