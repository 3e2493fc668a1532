"""`datasets` inputs: a Dataset object (one split of a DatasetDict) from Python, a save_to_disk folder and a folder
of data files from the command line."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_tokenizer, toy_pairs, write_jsonl
from pegasus_x import PegasusTokenizer, PegasusXConfig, PegasusXForConditionalGeneration
from pegasus_x.training.data import load_pairs
from pegasus_x.errors import DataError
from pegasus_x.metrics import GenerationOptions, evaluate
from pegasus_x.training.options import TrainOptions, options_record, resume_key

datasets = pytest.importorskip("datasets", reason="install the test extras: pip install -e '.[test]'")
ROWS = [{"document": "the cat sat on the mat", "summary": "a cat"}, {"document": "a dog ran", "summary": "dog"},
        {"document": "", "summary": "skipped"}]


def test_a_dataset_object_and_a_datasetdict_split():
    table = datasets.Dataset.from_list(ROWS)
    pairs = load_pairs(table, "document", "summary")
    assert [(e.source, e.target) for e in pairs.examples] == [("the cat sat on the mat", "a cat"), ("a dog ran", "dog")]
    assert pairs.skipped_empty == 1
    splits = datasets.DatasetDict(train=table, test=table.select([1]))
    assert len(load_pairs(splits["test"], "document", "summary")) == 1
    with pytest.raises(DataError, match=r"splits \['test', 'train'\].*data\['test'\]"):
        load_pairs(splits, "document", "summary")


def test_save_to_disk_folders_with_and_without_splits(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "one"))
    assert len(load_pairs(tmp_path / "one", "document", "summary")) == 2
    datasets.DatasetDict(train=datasets.Dataset.from_list(ROWS[:1]),
                         validation=datasets.Dataset.from_list(ROWS[1:])).save_to_disk(str(tmp_path / "two"))
    assert load_pairs(f"{tmp_path / 'two'}@validation", "document", "summary").examples[0].source == "a dog ran"
    with pytest.raises(DataError, match=r"holds the splits \['train', 'validation'\]; add @SPLIT"):
        load_pairs(tmp_path / "two", "document", "summary")
    with pytest.raises(DataError, match="not 'test'"):
        load_pairs(f"{tmp_path / 'two'}@test", "document", "summary")


def test_a_folder_of_data_files_reads_like_load_dataset(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")   # load_dataset caches there
    folder = tmp_path / "files"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", ROWS[:2])
    write_jsonl(folder / "test.jsonl", ROWS[1:2])
    assert len(load_pairs(f"{folder}@train", "document", "summary")) == 2
    assert len(load_pairs(f"{folder}@test", "document", "summary")) == 1


def test_train_options_record_a_dataset_by_its_fingerprint():
    table = datasets.Dataset.from_list(ROWS)
    options = TrainOptions(model="tiny", train=table, output_dir="out", max_steps=1)
    record = options_record(options)
    assert record["train"] == f"Dataset {table._fingerprint} (3 rows)" == resume_key(options)["train"]
    json.dumps(record)


def test_evaluate_takes_a_dataset(tmp_path):
    tokenizer = PegasusTokenizer.from_pretrained(make_tokenizer(tmp_path / "tok"))
    torch.manual_seed(0)
    model = PegasusXForConditionalGeneration(PegasusXConfig.tiny(
        vocab_size=tokenizer.vocab_size, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, block_size=4, num_global_tokens=2))
    table = datasets.Dataset.from_list(toy_pairs(3, max_words=8))
    metrics = evaluate(model, tokenizer, table, generation=GenerationOptions(max_new_tokens=3), progress=False)
    assert metrics["count"] == 3 and "rougeLsum" in metrics
