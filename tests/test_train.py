"""Fine-tuning: data readers, batching, the schedule, the loss, exact resume, distributed equality, evaluate."""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pegasus_x import PegasusXForConditionalGeneration
from pegasus_x.training.data import BatchStream, DataPosition, collate, load_pairs, plan_batches, shard, tokenize_pairs
from pegasus_x.errors import ConfigError, DataError
from pegasus_x.metrics import GenerationOptions, bleu_scores, evaluate, rouge_scores, sentence_per_line
from pegasus_x.tokenizer import PegasusTokenizer
from pegasus_x.training import TrainOptions, Trainer, train
from pegasus_x.training.commands import register
from pegasus_x.training.optim import lr_at
from pegasus_x.training.state import latest_checkpoint
from pegasus_x.training.trainer import label_smoothed_loss

from conftest import make_tokenizer, toy_pairs, write_jsonl

TINY = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=64, decoder_ffn_dim=64, block_size=6, num_global_tokens=3)


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matrices on a shared 2-core machine: extra intra-op threads only add spin-waiting.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpus")
    return {"tokenizer": make_tokenizer(root / "tok"),
            "train": write_jsonl(root / "train.jsonl", toy_pairs(40, seed=0)),
            "validation": write_jsonl(root / "val.jsonl", toy_pairs(6, seed=1))}


def options(corpus, out: Path, **changes) -> TrainOptions:
    base = dict(model="tiny", tokenizer=str(corpus["tokenizer"]), train=str(corpus["train"]), output_dir=str(out),
                max_steps=6, batch_size=5, grad_accum=2, learning_rate=3e-3, warmup_steps=2, schedule="linear",
                label_smoothing=0.1, seed=3, max_source_length=37, max_target_length=9, config_overrides=TINY,
                log_every=1, device="cpu")
    base.update(changes)
    return TrainOptions(**base)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


# ---------------------------------------------------------------------------------------------------- reading
ROWS = [{"source": "a long document", "target": "a summary"}, {"source": "second text", "target": "second"}]


def _write(path: Path, kind: str, rows: list[dict]) -> Path:
    if kind in ("jsonl", "jsonl.gz"):
        text = "".join(json.dumps(r) + "\n" for r in rows)
        path.write_bytes(gzip.compress(text.encode()) if kind.endswith(".gz") else text.encode())
    elif kind == "json":
        path.write_text(json.dumps(rows))
    elif kind in ("csv", "tsv"):
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="," if kind == "csv" else "\t")
            writer.writeheader()
            writer.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "json", "csv", "tsv", "parquet"])
def test_every_format_reads_the_same_pairs(tmp_path, kind):
    rows = ROWS + [{"source": "quoted, with \"commas\"\nand a newline", "target": "tricky"},
                   {"source": "long " * 40_000, "target": "longer than the csv module's default field limit"}]
    data = load_pairs(_write(tmp_path / f"pairs.{kind}", kind, rows))
    assert [(e.source, e.target) for e in data.examples] == [(r["source"].strip(), r["target"]) for r in rows]
    assert data.skipped_empty == 0


def test_custom_columns_and_missing_column_lists_the_available_ones(tmp_path):
    path = _write(tmp_path / "p.csv", "csv", [{"article": "doc one", "highlights": "sum one"}])
    data = load_pairs(path, source_column="article", target_column="highlights")
    assert data.examples[0].source == "doc one"
    with pytest.raises(DataError, match=r"no column 'source'.*\['article', 'highlights'\].*--source-column"):
        load_pairs(path)


def test_empty_rows_are_skipped_and_counted(tmp_path):
    rows = ROWS + [{"source": "  ", "target": "x"}, {"source": "doc", "target": ""}, {"source": "doc"}]
    data = load_pairs(_write(tmp_path / "p.jsonl", "jsonl", rows))
    assert len(data) == 2 and data.skipped_empty == 3
    assert "3 rows with empty text skipped" in data.describe()


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_empty_file_is_a_data_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match="empty"):
        load_pairs(path)


def test_all_rows_empty_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no usable pair"):
        load_pairs(_write(tmp_path / "p.jsonl", "jsonl", [{"source": "", "target": "x"}]))


def test_bad_inputs_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="unknown data format"):
        load_pairs(_write(tmp_path / "p.txt", "json", ROWS))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"source": "a", "target": "b"}\n{oops\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        load_pairs(bad)
    with pytest.raises(DataError, match="does not exist"):
        load_pairs(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="expected text"):
        load_pairs(_write(tmp_path / "n.jsonl", "jsonl", [{"source": 3, "target": "b"}]))


def test_dataset_names_need_the_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)       # makes `import datasets` fail
    with pytest.raises(DataError, match="pip install datasets"):
        load_pairs("someone/some-corpus@validation")


# ---------------------------------------------------------------------------------------------------- batching
def test_token_budget_batches_cover_every_example_once_and_respect_the_budget():
    src = [5 + (7 * i) % 40 for i in range(100)]
    tgt = [2 + i % 6 for i in range(100)]
    plan = plan_batches(src, tgt, max_tokens=120, seed=1, epoch=0)
    assert sorted(i for b in plan for i in b) == list(range(100))
    for batch in plan:
        cost = len(batch) * (max(src[i] for i in batch) + max(tgt[i] for i in batch))
        assert cost <= 120 or len(batch) == 1
    assert plan == plan_batches(src, tgt, max_tokens=120, seed=1, epoch=0)
    assert plan != plan_batches(src, tgt, max_tokens=120, seed=1, epoch=1)
    assert plan != plan_batches(src, tgt, max_tokens=120, seed=2, epoch=0)


def test_length_grouping_pads_less_than_random_batches():
    src = [(37 * i) % 200 + 1 for i in range(640)]
    grouped = plan_batches(src, [1] * 640, batch_size=8, seed=0)
    padded = sum(len(b) * max(src[i] for i in b) for b in grouped)
    naive = sum(8 * max(src[i:i + 8]) for i in range(0, 640, 8))
    assert padded < 0.8 * naive


def test_shards_partition_a_batch():
    batch = [9, 4, 7, 1, 3]
    parts = [shard(batch, r, 2) for r in range(2)]
    assert parts == [[9, 7, 3], [4, 1]] and sorted(parts[0] + parts[1]) == sorted(batch)


def test_stream_resumes_at_its_position_across_epochs():
    pairs = tokenize_pairs(load_pairs_from_rows(toy_pairs(12)).examples, _CharTokenizer(), 50, 10)
    stream = BatchStream(pairs, batch_size=5, max_tokens=None, seed=4)
    seen = [next(stream) for _ in range(7)]                  # 3 batches per epoch: crosses two epochs
    resumed = BatchStream(pairs, batch_size=5, max_tokens=None, seed=4, position=DataPosition(1, 1))
    assert [next(resumed) for _ in range(3)] == seen[4:7]
    assert stream.position == DataPosition(2, 1)


def test_collate_pads_right_and_masks_labels():
    pairs = tokenize_pairs(load_pairs_from_rows(ROWS).examples, _CharTokenizer(), 50, 10)
    batch = collate(pairs, [0, 1])
    lengths = [len(s) for s in pairs.source_ids]
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["labels"][1, len(pairs.target_ids[1]):].eq(-100).all()
    assert batch["input_ids"][1, lengths[1]:].eq(0).all()


class _CharTokenizer:
    """Independent stand-in: one id per character, then </s> = 1, truncated keeping </s>."""

    def __call__(self, texts, max_length, truncation):
        ids = [[3 + ord(c) % 50 for c in t][:max_length - 1] + [1] for t in texts]
        return {"input_ids": ids}


def load_pairs_from_rows(rows):
    from pegasus_x.training.data import Example, PairDataset

    return PairDataset([Example(r["source"], r["target"]) for r in rows], 0, "rows")


# ---------------------------------------------------------------------------------------------------- schedule, loss
def test_lr_schedule_values():
    peak = 2.0
    assert [lr_at(s, peak, "constant", 4, 20) for s in (0, 1, 3, 4, 19)] == [0.5, 1.0, 2.0, 2.0, 2.0]
    assert lr_at(4, peak, "linear", 4, 20) == 2.0
    assert lr_at(12, peak, "linear", 4, 20) == pytest.approx(1.0)
    assert lr_at(20, peak, "linear", 4, 20) == 0.0
    assert lr_at(12, peak, "cosine", 4, 20) == pytest.approx(1.0)
    assert lr_at(8, peak, "cosine", 4, 20) == pytest.approx(2.0 * (1 + math.cos(math.pi / 4)) / 2)
    assert lr_at(15, peak, "rsqrt", 4, 20) == pytest.approx(2.0 * math.sqrt(4 / 16))
    assert lr_at(3, peak, "rsqrt", 4, 20) == 2.0
    assert lr_at(0, peak, "constant", 0, 20) == 2.0


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smoothing_matches_the_textbook_formula(eps):
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[1, 3:] = -100
    logp = logits.log_softmax(-1)
    target = torch.full_like(logp, eps / 11)
    keep = labels != -100
    target.scatter_add_(-1, labels.clamp(min=0)[..., None], torch.full((2, 5, 1), 1.0 - eps))
    expected = -(target * logp).sum(-1)[keep].sum()
    assert label_smoothed_loss(logits, labels, eps).item() == pytest.approx(expected.item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------------- training
def test_train_writes_a_loadable_model_and_metrics(corpus, tmp_path):
    result = train(options(corpus, tmp_path / "out", validation=str(corpus["validation"]), eval_every=3,
                           max_steps=6, keep_best=1))
    out = tmp_path / "out"
    for name in ("config.json", "model.safetensors", "generation_config.json", "spiece.model", "metrics.jsonl"):
        assert (out / name).is_file(), name
    model = PegasusXForConditionalGeneration.from_pretrained(out)
    assert model.config.vocab_size == PegasusTokenizer.from_pretrained(out).vocab_size
    assert model.generation_config["max_new_tokens"] == 9
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_losses = [e["loss"] for e in log if e["split"] == "train"]
    evals = {e["step"]: e["loss"] for e in log if e["split"] == "validation"}
    assert len(train_losses) == 6 and set(evals) == {3, 6} and train_losses[-1] < train_losses[0]
    best = min(evals, key=evals.get)
    assert {p.name for p in out.glob("checkpoint-*")} == {f"checkpoint-{best}", "checkpoint-6"}
    assert result.step == 6


def test_a_checkpoint_folder_is_a_model_for_every_command(corpus, tmp_path):
    train(options(corpus, tmp_path / "a", max_steps=2))
    result = train(options(corpus, tmp_path / "b", model=str(tmp_path / "a"), tokenizer=None, config_overrides={},
                           max_steps=1))
    assert result.step == 1 and (tmp_path / "b" / "spiece.model").is_file()


def test_existing_run_needs_resume(corpus, tmp_path):
    train(options(corpus, tmp_path / "out", max_steps=1))
    with pytest.raises(ConfigError, match="--resume"):
        Trainer(options(corpus, tmp_path / "out", max_steps=2))


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_resume_after_a_kill_equals_an_uninterrupted_run(corpus, tmp_path, monkeypatch, optimizer):
    opts = dict(optimizer=optimizer, save_every=3, max_steps=6)
    train(options(corpus, tmp_path / "full", **opts))

    real_save = Trainer._save_checkpoint

    def save_then_die(self, metrics):
        real_save(self, metrics)
        raise KeyboardInterrupt                              # the process dies right after step 3's checkpoint

    monkeypatch.setattr(Trainer, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(options(corpus, tmp_path / "killed", **opts))
    monkeypatch.setattr(Trainer, "_save_checkpoint", real_save)
    assert latest_checkpoint(tmp_path / "killed").name == "checkpoint-3"
    assert not (tmp_path / "killed" / "model.safetensors").exists()
    train(options(corpus, tmp_path / "killed", resume=True, **opts))

    full, resumed = weights(tmp_path / "full"), weights(tmp_path / "killed")
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
    # and dropout was on, so the RNG state had to be restored too
    assert PegasusXForConditionalGeneration.from_pretrained(tmp_path / "full").config.dropout > 0


def test_kill_during_a_save_leaves_the_previous_checkpoint(corpus, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = PegasusTokenizer.save_pretrained

    def dies_on_second_save(self, folder):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt                          # half of checkpoint-4 is on disk
        return real(self, folder)

    monkeypatch.setattr(PegasusTokenizer, "save_pretrained", dies_on_second_save)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        train(options(corpus, out, save_every=2, max_steps=6))
    monkeypatch.setattr(PegasusTokenizer, "save_pretrained", real)
    assert (out / ".checkpoint-4.tmp").is_dir() and not (out / "checkpoint-4").exists()
    assert latest_checkpoint(out).name == "checkpoint-2"
    model = PegasusXForConditionalGeneration.from_pretrained(out / "checkpoint-2")
    assert model.config.d_model == TINY["d_model"]
    result = train(options(corpus, out, save_every=2, max_steps=6, resume=True))
    assert result.step == 6 and not (out / ".checkpoint-4.tmp").exists()


def test_options_are_validated():
    with pytest.raises(ConfigError, match="max_steps"):
        TrainOptions(model="tiny", train="t", output_dir="o")
    with pytest.raises(ConfigError, match="eval_samples"):
        TrainOptions(model="tiny", train="t", output_dir="o", max_steps=1, metric="rougeL")
    with pytest.raises(ConfigError, match="preset"):
        TrainOptions(model="some/dir", train="t", output_dir="o", max_steps=1, config_overrides={"d_model": 8})


# ---------------------------------------------------------------------------------------------------- distributed
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_gloo_ranks_equal_one_process(corpus, tmp_path, fsdp):
    # batch_size 3 over 2 ranks: uneven shards, and the epoch's last batch (1 example) leaves rank 1 empty.
    common = dict(max_steps=11, batch_size=3, grad_accum=2, label_smoothing=0.1, optimizer="adamw",
                  config_overrides={**TINY, "dropout": 0.0})
    train(options(corpus, tmp_path / "single", **common))
    spec = {**options(corpus, tmp_path / "multi", fsdp=fsdp, **common).__dict__}
    (tmp_path / "opts.json").write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(Path(__file__).parent / "_train_dist.py"),
           str(tmp_path / "opts.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, multi = weights(tmp_path / "single"), weights(tmp_path / "multi")
    assert single.keys() == multi.keys()
    for name in single:
        torch.testing.assert_close(multi[name], single[name], rtol=0, atol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------------- evaluate
def test_scores_of_identical_and_disjoint_texts():
    same = ["the cat sat on the mat. it was happy."]
    assert rouge_scores(same, same) == pytest.approx({"rouge1": 100, "rouge2": 100, "rougeL": 100, "rougeLsum": 100})
    assert rouge_scores(["dogs bark loudly"], ["cats purr"])["rouge1"] == 0.0
    assert bleu_scores(["a b c d e"], ["a b c d e"]) == pytest.approx({"bleu": 100.0, "chrf": 100.0})
    assert bleu_scores(["x y z"], ["a b c d"])["bleu"] == 0.0
    assert sentence_per_line("One. Two! Three?\nFour") == "One.\nTwo!\nThree?\nFour"


def test_rouge_lsum_uses_sentences():
    # Lsum takes the union LCS over sentences: reordered sentences keep a perfect Lsum but not rougeL.
    scores = rouge_scores(["second part here. first part there."], ["first part there. second part here."])
    assert scores["rougeLsum"] == pytest.approx(100.0) and scores["rougeL"] < 100.0


def _evaluate_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_evaluate_writes_predictions_and_rouge(corpus, tmp_path, capsys):
    train(options(corpus, tmp_path / "model", max_steps=2))
    code = _evaluate_cli(["evaluate", "--model", str(tmp_path / "model"), "--data", str(corpus["validation"]),
                          "--max-new-tokens", "5", "--num-beams", "2", "--batch-size", "4",
                          "--output-dir", str(tmp_path / "eval")])
    assert code == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(("rouge1", "rouge2", "rougeL", "rougeLsum")) <= set(metrics) and metrics["count"] == 6
    assert metrics["generation"]["num_beams"] == 2
    predictions = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    sources = [json.loads(line)["source"] for line in corpus["validation"].read_text().splitlines()]
    assert [p["source"] for p in predictions] == sources               # input order kept despite length sorting
    assert json.loads(capsys.readouterr().out)["rougeL"] == metrics["rougeL"]


def test_translation_is_scored_with_bleu_and_chrf(corpus, tmp_path):
    tokenizer = PegasusTokenizer.from_pretrained(corpus["tokenizer"])
    from pegasus_x import PegasusXConfig

    torch.manual_seed(0)
    model = PegasusXForConditionalGeneration(PegasusXConfig.tiny(vocab_size=tokenizer.vocab_size, **TINY))
    examples = load_pairs_from_rows([{"source": "the cat", "target": "le chat"},
                                     {"source": "the dog ran", "target": "le chien court"}]).examples
    metrics = evaluate(model, tokenizer, examples, "translation", GenerationOptions(max_new_tokens=4),
                       output_dir=tmp_path)
    assert {"bleu", "chrf"} <= set(metrics) and "rouge1" not in metrics
    assert 0.0 <= metrics["bleu"] <= 100.0 and 0.0 <= metrics["chrf"] <= 100.0
    assert (tmp_path / "predictions.jsonl").is_file()


def test_fsdp_shards_every_decoder_layer_and_keeps_the_gradients(tmp_path):
    # Issue #16: decoder layers project their own cross-attention keys/values, so the trainer can make each one an
    # FSDP unit; before, the decoder projected them for all layers outside the layers' hooks and had to stay whole.
    # One gloo rank in this process: the sharding plan is the trainer's own (Trainer._wrap), cheap to run here.
    import copy
    from types import SimpleNamespace

    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from pegasus_x import PegasusXConfig

    torch.manual_seed(0)
    plain = PegasusXForConditionalGeneration(PegasusXConfig.tiny(vocab_size=64, **{**TINY, "dropout": 0.0}))
    ids, labels = torch.randint(2, 64, (2, 23)), torch.randint(2, 64, (2, 5))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        fake = SimpleNamespace(world_size=2, options=SimpleNamespace(fsdp=True), model=copy.deepcopy(plain),
                               device=torch.device("cpu"))
        sharded = Trainer._wrap(fake)
        assert all(isinstance(layer, FSDPModule) for layer in sharded.model.decoder.layers)
        for model in (plain, sharded):
            model.train()
            model.gradient_checkpointing_enable()
            model(input_ids=ids, labels=labels).loss.backward()
        grads = {name: p.grad.full_tensor() for name, p in sharded.named_parameters()}
    finally:
        dist.destroy_process_group()
    for name, p in plain.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)
