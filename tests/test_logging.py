"""Library messages go through the `pegasus_x` logger (the CLI shows them as `pegasus-x: ...` lines), and
`evaluate` shows a progress bar on a terminal like `summarize` and `train`."""

from __future__ import annotations

import ast
import io
import logging
from pathlib import Path

import pytest
import torch

import pegasus_x
from conftest import make_tokenizer, toy_pairs, write_jsonl
from pegasus_x import PegasusTokenizer, PegasusXConfig, PegasusXForConditionalGeneration
from pegasus_x.cli import main
from pegasus_x.training.data import Example
from pegasus_x.metrics import GenerationOptions, evaluate
from pegasus_x.training import TrainOptions, train

SRC = Path(pegasus_x.__file__).parent      # the package under test, wherever it is installed
TINY = dict(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=32, decoder_ffn_dim=32, block_size=4, num_global_tokens=2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpus")
    rows = toy_pairs(6, seed=0, max_words=12) + [{"source": "", "target": "dropped"}]
    return {"tokenizer": make_tokenizer(root / "tok"), "train": write_jsonl(root / "train.jsonl", rows)}


def _options(corpus, out: Path) -> TrainOptions:
    return TrainOptions(model="tiny", tokenizer=str(corpus["tokenizer"]), train=str(corpus["train"]),
                        output_dir=str(out), max_steps=1, batch_size=3, max_source_length=16, max_target_length=6,
                        config_overrides=TINY, device="cpu")


def test_no_print_to_stderr_in_the_library():
    offenders, scanned = [], 0
    for path in SRC.rglob("*.py"):
        scanned += 1
        if path.name == "cli.py":          # the command line prints its own lines
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print"
                    and any(k.arg == "file" for k in node.keywords)):
                offenders.append(f"{path.name}:{node.lineno}")
    assert scanned > 10 and offenders == []


@pytest.mark.slow
def test_trainer_messages_are_log_records_and_can_be_silenced(corpus, tmp_path, caplog, capfd):
    with caplog.at_level(logging.INFO, logger="pegasus_x"):
        train(_options(corpus, tmp_path / "a"))
    records = [r for r in caplog.records if r.name == "pegasus_x.training.trainer"]
    assert records and "train.jsonl: 6 pairs (1 rows with empty text skipped)" in records[0].getMessage()
    assert all(r.levelno == logging.INFO for r in records)
    assert capfd.readouterr().err == ""                          # nothing printed around the logger
    caplog.clear()
    logger = logging.getLogger("pegasus_x")
    logger.setLevel(logging.ERROR)
    try:
        train(_options(corpus, tmp_path / "b"))
    finally:
        logger.setLevel(logging.NOTSET)
    assert not [r for r in caplog.records if r.name.startswith("pegasus_x")]


def test_cli_shows_library_log_records_as_one_line_each(corpus, tmp_path, capsys):
    argv = ["train", "--model", "tiny", "--tokenizer", str(corpus["tokenizer"]), "--train", str(corpus["train"]),
            "--output-dir", str(tmp_path / "c"), "--max-steps", "1", "--batch-size", "3", "--max-source-length",
            "16", "--max-target-length", "6", "--device", "cpu"]
    for key, value in TINY.items():
        argv += ["--config-override", f"{key}={value}"]
    assert main(argv) == 0
    err = capsys.readouterr().err.splitlines()
    assert "pegasus-x: train.jsonl: 6 pairs (1 rows with empty text skipped); 1 steps" in err[0]
    assert all(line.startswith("pegasus-x: ") for line in err)
    assert not logging.getLogger("pegasus_x").handlers            # main's handler is gone again


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _tiny_model(tokenizer: PegasusTokenizer) -> PegasusXForConditionalGeneration:
    torch.manual_seed(0)
    return PegasusXForConditionalGeneration(PegasusXConfig.tiny(vocab_size=tokenizer.vocab_size, **TINY))


def test_evaluate_shows_a_progress_bar_on_a_terminal_only(corpus, monkeypatch):
    tokenizer = PegasusTokenizer.from_pretrained(corpus["tokenizer"])
    model = _tiny_model(tokenizer)
    examples = [Example("the cat sat on the mat", "the cat"), Example("a dog ran", "a dog"),
                Example("red fox jumps", "red fox")]
    generation = GenerationOptions(max_new_tokens=3)
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    evaluate(model, tokenizer, examples, generation=generation, batch_size=2)
    assert "evaluate:" in terminal.getvalue() and "0/3 [" in terminal.getvalue()
    quiet = _Terminal()
    monkeypatch.setattr("sys.stderr", quiet)
    evaluate(model, tokenizer, examples, generation=generation, batch_size=2, progress=False)
    assert quiet.getvalue() == ""
    piped = io.StringIO()
    monkeypatch.setattr("sys.stderr", piped)
    evaluate(model, tokenizer, examples, generation=generation, batch_size=2)
    assert piped.getvalue() == ""
