"""`pegasus-x` end to end: subprocesses (marked slow) and main() in process, on the tiny checkpoint of conftest.py.

The oracle for every summary is the model's own `generate` called directly, one text at a time, on ids the test
builds from the tokenizer: so these tests check the plumbing (reading, truncation, chunking, batching, ordering,
sharding, output), not the model. The `Summarizer` Python API: test_summarize.py.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pegasus_x import PegasusXForConditionalGeneration, __version__, native
from pegasus_x.cli import main
from pegasus_x.config import PegasusXConfig
from pegasus_x.errors import ConfigError
from pegasus_x.summarize import Summarizer

from conftest import BLOCK, LIMIT, LONG, NEW, SHORT, chunked_oracle


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
    # What the model really runs (issue #15, item 10): resolved fields, the dtype it loads in, generation defaults.
    assert "embeddings  tied (LM head = shared embedding), scaled by sqrt(d_model)" in out
    assert "dtype       float32 by default (stored F32)" in out and "staggered" in out
    assert ("generation  greedy, length_penalty 1, up to 16,383 new tokens, eos [1], forced eos [], start 0, pad 0 "
            "(from generation_config.json)") in out
    assert f"CPU kernels {native.describe()}\n" in out
    memory = next(line for line in out.splitlines() if line.startswith("memory      at least "))
    assert float(memory.split()[3]) * 1e6 >= model.num_parameters() * 4 and memory.split()[4] == "MB", memory


def test_info_shows_resolved_fields_and_refuses_string_booleans(checkpoint, tmp_path):
    """Untied embeddings count the LM head; a folder the model would refuse is refused here, in one line."""
    folder = tmp_path / "untied"
    config = PegasusXConfig.tiny(vocab_size=300, tie_word_embeddings=False, stagger_local_blocks=False,
                                 decoder_attention_heads=2, decoder_ffn_dim=32)
    model = PegasusXForConditionalGeneration(config)
    model.generation_config = {"num_beams": 3, "gnmt_alpha": 0.6, "max_new_tokens": 9, "decoder_start_token_id": 0,
                               "eos_token_id": 1}
    model.save_pretrained(folder)
    out, err = decoded(cli("info", str(folder)))
    assert f"parameters  {model.num_parameters():,} (F32)" in out, err
    assert "4+2 heads, ffn 128+32" in out and "not staggered" in out and "embeddings  not tied" in out
    assert "generation  beam search (3 beams), gnmt_alpha 0.6, up to 9 new tokens" in out
    data = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**data, "tie_word_embeddings": "false"}))
    proc = cli("info", str(folder))
    out, err = decoded(proc)
    assert proc.returncode == 2 and out == ""
    assert err == "pegasus-x: error: config.tie_word_embeddings must be true or false (a JSON boolean, not a " \
                  "string), got 'false'\n"


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


def test_info_says_when_the_model_cannot_fit(tmp_path, monkeypatch, capsys):
    from pegasus_x import config as config_module

    PegasusXForConditionalGeneration(PegasusXConfig.tiny(vocab_size=300)).save_pretrained(tmp_path)
    monkeypatch.setattr(config_module, "machine_memory", lambda: 10**5)
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "; this machine has 100.0 kB: too little, loading is refused" in out, out
    with pytest.raises(ConfigError, match="this machine has 0.1 MB"):
        PegasusXForConditionalGeneration.from_pretrained(tmp_path)
