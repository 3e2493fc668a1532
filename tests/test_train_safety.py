"""Training never loses the user's files, refuses options that cannot work, and stops instead of saving garbage."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pegasus_x import PegasusXConfig, PegasusXForConditionalGeneration
from pegasus_x.training import trainer as trainer_module
from pegasus_x.cli import main
from pegasus_x.errors import ConfigError, DataError
from pegasus_x.tokenizer import PegasusTokenizer
from pegasus_x.training import TrainOptions, Trainer, train
from pegasus_x.training.state import latest_checkpoint
from pegasus_x.training.options import MAX_STEPS
from pegasus_x.training.output import metrics_line, open_output_folder

from conftest import make_tokenizer, toy_pairs, write_jsonl

TINY = dict(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=32, decoder_ffn_dim=32, block_size=6, num_global_tokens=2)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpus")
    return {"tokenizer": make_tokenizer(root / "tok"), "train": write_jsonl(root / "train.jsonl", toy_pairs(20)),
            "validation": write_jsonl(root / "val.jsonl", toy_pairs(4, seed=1))}


def options(corpus, out: Path, **changes) -> TrainOptions:
    base = dict(model="tiny", tokenizer=str(corpus["tokenizer"]), train=str(corpus["train"]), output_dir=str(out),
                max_steps=2, batch_size=5, learning_rate=3e-3, seed=3, max_source_length=30, max_target_length=8,
                config_overrides=TINY, log_every=1, device="cpu")
    base.update(changes)
    return TrainOptions(**base)


def strict_lines(path: Path) -> list[dict]:
    """The JSON lines of ``path``, refusing NaN/Infinity (not JSON, though Python's json module writes them)."""
    def refuse(token):
        raise ValueError(f"{token} is not JSON")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------- item 3
@pytest.fixture
def model_folder(corpus, tmp_path) -> Path:
    """A model folder in the Hugging Face layout, as a user downloads it (no trainer files)."""
    tokenizer = PegasusTokenizer.from_pretrained(corpus["tokenizer"])
    torch.manual_seed(0)
    model = PegasusXForConditionalGeneration(PegasusXConfig.tiny(vocab_size=tokenizer.vocab_size, **TINY))
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_the_model_folder_is_never_the_output_folder(corpus, model_folder):
    before = (model_folder / "model.safetensors").read_bytes()
    spelled_otherwise = model_folder.parent / "." / model_folder.name
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match="folder of the model being trained"):
            train(options(corpus, spelled_otherwise, model=str(model_folder), tokenizer=None, config_overrides={},
                          overwrite_output_dir=overwrite))
    assert (model_folder / "model.safetensors").read_bytes() == before


def test_a_folder_with_other_files_needs_overwrite_and_keeps_them(corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"did not write \(notes.txt\).*--overwrite-output-dir"):
        Trainer(options(corpus, out))
    train(options(corpus, out, overwrite_output_dir=True))
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").is_file()
    # a later run in the same folder still knows which files are the user's
    with pytest.raises(ConfigError, match="notes.txt"):
        Trainer(options(corpus, out, resume=True))


@pytest.mark.parametrize("name", ["config.json", "checkpoint-2", "metrics.jsonl"])
def test_overwrite_still_never_replaces_a_foreign_file(corpus, tmp_path, name):
    out = tmp_path / "out"
    (out / "checkpoint-2" if name == "checkpoint-2" else out).mkdir(parents=True)
    foreign = out / "checkpoint-2" / "weights.bin" if name == "checkpoint-2" else out / name
    foreign.write_text("another tool's")
    with pytest.raises(ConfigError, match=f"{name}, not written by pegasus-x"):
        train(options(corpus, out, overwrite_output_dir=True, save_every=1))
    assert foreign.read_text() == "another tool's"


def test_a_foreign_checkpoint_is_neither_resumed_nor_deleted(corpus, tmp_path):
    train(options(corpus, tmp_path / "ours", save_every=1, keep_best=1))
    copied = tmp_path / "other" / "checkpoint-1"
    copied.parent.mkdir()
    (tmp_path / "ours" / "checkpoint-2").rename(copied)           # looks like ours, but no run of ours wrote it
    assert latest_checkpoint(copied.parent) is None
    with pytest.raises(ConfigError, match="checkpoint-1"):
        train(options(corpus, copied.parent, overwrite_output_dir=True, save_every=1))
    assert (copied / "model.safetensors").is_file()


def test_temporary_files_of_a_killed_write_do_not_block_the_next_run(corpus, tmp_path):
    out = tmp_path / "out"
    train(options(corpus, out))
    leftover = out / ".metrics.jsonl.k1ll3d.tmp"          # what atomic_write_bytes leaves when killed mid-write
    leftover.write_text("half")
    assert train(options(corpus, out, resume=True)).step == 2
    assert not leftover.exists()


# ---------------------------------------------------------------------------------------------------- item 14
def test_an_output_dir_that_is_a_file_or_unwritable_fails_before_any_work(corpus, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    missing = str(tmp_path / "missing.jsonl")        # reading it first would raise a DataError instead
    with pytest.raises(ConfigError, match="is a file"):
        Trainer(options(corpus, afile, train=missing))
    with pytest.raises(ConfigError, match="cannot write to --output-dir"):
        Trainer(options(corpus, afile / "sub", train=missing))
    assert afile.read_text() == "x"


def test_a_read_only_output_dir_fails_before_any_work(corpus, tmp_path):
    import os

    if os.geteuid() == 0:
        folder = Path("/sys/pegasus-x-test-output")  # permission bits do not stop root; sysfs refuses new entries
    else:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
    try:
        with pytest.raises(ConfigError, match="cannot write to --output-dir"):
            Trainer(options(corpus, folder, train=str(tmp_path / "missing.jsonl")))
    finally:
        if folder.parent == tmp_path:
            folder.chmod(0o755)


# ---------------------------------------------------------------------------------------------------- lock
def test_a_second_run_into_a_locked_folder_is_refused(corpus, tmp_path):
    out = tmp_path / "out"
    held = open_output_folder(out, "tiny")
    with pytest.raises(ConfigError, match="another training run is writing to"):
        Trainer(options(corpus, out))
    held.close()
    with pytest.raises(DataError, match="does not exist"):           # fails after taking the lock …
        Trainer(options(corpus, out, train=str(tmp_path / "missing.jsonl")))
    open_output_folder(out, "tiny").close()                           # … and released it


# ---------------------------------------------------------------------------------------------------- metrics JSON
def test_non_finite_metrics_are_written_as_null(corpus, tmp_path, monkeypatch):
    assert json.loads(metrics_line({"step": 1, "loss": math.nan, "x": [math.inf]})) == {"step": 1, "loss": None,
                                                                                         "x": [None]}
    monkeypatch.setattr(Trainer, "_evaluate", lambda self: {"loss": math.nan})
    out = tmp_path / "out"
    train(options(corpus, out, validation=str(corpus["validation"]), eval_every=1))
    evals = [e for e in strict_lines(out / "metrics.jsonl") if e["split"] == "validation"]
    assert [e["loss"] for e in evals] == [None, None]
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text(),
                       parse_constant=lambda token: pytest.fail(f"{token} in trainer_state.json"))
    assert state["eval_metrics"] == {"loss": None}


def test_a_resumed_run_writes_each_step_once(corpus, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_step = Trainer._train_step

    def die_at_step_5(self, batches):
        if self.step == 4:
            raise KeyboardInterrupt                   # steps 1-4 logged, checkpoint-3 saved
        return real_step(self, batches)

    monkeypatch.setattr(Trainer, "_train_step", die_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train(options(corpus, out, max_steps=6, save_every=3))
    monkeypatch.setattr(Trainer, "_train_step", real_step)
    (out / "metrics.jsonl").open("a").write('{"split": "train", "st')     # a line cut off by the kill
    train(options(corpus, out, max_steps=6, save_every=3, resume=True))
    assert [e["step"] for e in strict_lines(out / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------------------------------------------- items 9, 12, 16
@pytest.mark.parametrize("change, message", [
    (dict(max_steps=None, epochs=1e300), "optimizer steps"),
    (dict(max_steps=10**30), "optimizer steps"),
    (dict(max_steps=None, epochs=math.nan), "epochs must be a finite number"),
    (dict(max_steps=None, epochs=math.inf), "epochs must be a finite number"),
    (dict(learning_rate=math.inf), "learning_rate must be a finite number"),
    (dict(learning_rate=math.nan), "learning_rate must be a finite number"),
    (dict(weight_decay=-0.1), "weight_decay must be non-negative"),
    (dict(clip=math.nan), "clip must be a finite number"),
    (dict(seed=-1), r"seed must be in \[0, 4294967295\]"),
    (dict(seed=2**70), r"seed must be in \[0, 4294967295\]"),
    (dict(eval_samples=-1), "eval_samples must be non-negative"),
    (dict(batch_size=2.5), "batch_size must be an integer"),
    (dict(generation_config={"num_beam": 4}), "unknown key.*num_beam"),
])
def test_options_that_cannot_work_are_refused(corpus, tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        options(corpus, tmp_path / "out", **change)


def test_epochs_that_cannot_finish_are_refused_once_the_data_is_counted(corpus, tmp_path):
    # 20 pairs in batches of 5: 4 steps an epoch, so MAX_STEPS / 2 epochs are twice too many
    with pytest.raises(ConfigError, match=f"epochs={MAX_STEPS // 2} asks for more than"):
        Trainer(options(corpus, tmp_path / "out", max_steps=None, epochs=MAX_STEPS // 2))


def test_cli_reports_bad_numbers_as_one_line(corpus, tmp_path, capsys):
    common = ["train", "--model", "tiny", "--tokenizer", str(corpus["tokenizer"]), "--train", str(corpus["train"]),
              "--output-dir", str(tmp_path / "out")]
    for argv in (common + ["--epochs", "nan"], common + ["--max-steps", "1", "--seed", "-1"],
                 common + ["--max-steps", "1", "--seed", str(2**70)],
                 ["evaluate", "--model", "x", "--data", str(corpus["train"]), "--batch-size", "0"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("pegasus-x: error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = trainer_module.token_loss

    def nan_from_step_3(*args):
        calls["n"] += 1                                           # one call per step (grad_accum 1)
        loss = real(*args)
        return loss * math.nan if calls["n"] >= 3 else loss

    monkeypatch.setattr(trainer_module, "token_loss", nan_from_step_3)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"step 3: training diverged.*last good checkpoint is .*checkpoint-2"):
        train(options(corpus, out, max_steps=4, save_every=2))
    assert latest_checkpoint(out).name == "checkpoint-2" and not (out / "model.safetensors").exists()
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "checkpoint-2" / "model.safetensors")).values())


# ---------------------------------------------------------------------------------------------------- item 11
def test_resume_refuses_options_that_break_exactness_naming_them(corpus, tmp_path):
    out = tmp_path / "out"
    train(options(corpus, out, schedule="constant"))
    with pytest.raises(ConfigError, match=r"options differ.*learning_rate 0.003 -> 0.002; optimizer adamw -> "
                                          r"adafactor; seed 3 -> 4\. Resume with the same options"):
        Trainer(options(corpus, out, schedule="constant", resume=True, learning_rate=2e-3, seed=4,
                        optimizer="adafactor"))
    other = write_jsonl(tmp_path / "train.jsonl", toy_pairs(20, seed=5))
    with pytest.raises(ConfigError, match=r"options differ.*train .*train.jsonl .*bytes.* -> .*train.jsonl"):
        Trainer(options(corpus, out, schedule="constant", resume=True, train=str(other)))
    # evaluation, logging and (with a constant learning rate) the run's length may change
    result = train(options(corpus, out, schedule="constant", resume=True, max_steps=3, log_every=2))
    assert result.step == 3


def test_resume_refuses_a_new_length_where_the_learning_rate_decays_towards_it(corpus, tmp_path):
    out = tmp_path / "out"
    train(options(corpus, out, schedule="linear"))
    with pytest.raises(ConfigError, match="max_steps 2 -> 3"):
        Trainer(options(corpus, out, schedule="linear", resume=True, max_steps=3))


# ---------------------------------------------------------------------------------------------------- item 18
def test_an_invalid_generation_config_is_refused_before_training(corpus, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="num_beams must be an integer >= 1, got -4.*--generation-config"):
        Trainer(options(corpus, out, generation_config={"num_beams": -4}))
    assert not list(out.glob("checkpoint-*")) and not (out / "model.safetensors").exists()
