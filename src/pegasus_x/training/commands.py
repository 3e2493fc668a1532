"""The ``train`` and ``evaluate`` subcommands: their flags, and the runs they start (see :mod:`pegasus_x.training`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from dataclasses import asdict, fields
from typing import Any

from .data import load_pairs
from ..devices import resolve_device
from ..errors import ConfigError
from ..metrics import GenerationOptions, evaluate
from ..model import PegasusXForConditionalGeneration
from ..quantize import KV_CHOICES
from ..quantize import MODES as QUANTIZE_MODES
from . import train
from .options import DEFAULT_BATCH_SIZE, METRICS, OPTIMIZERS, SCHEDULES, TrainOptions
from .output import json_safe

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- CLI
def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` and ``evaluate`` subcommands (each sets ``func``: args -> exit status)."""
    d = {f.name: f.default for f in fields(TrainOptions) if f.default is not dataclasses.MISSING}
    p = subparsers.add_parser("train", help="fine-tune or train a model on source/target pairs",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint folder, hub id, or preset: tiny, base, large")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the checkpoint's; PEGASUS's for presets)")
    p.add_argument("--train", required=True, help="training pairs: .jsonl/.csv/.tsv/.parquet or NAME[:CONFIG][@SPLIT]")
    p.add_argument("--validation", help="validation pairs (same formats)")
    p.add_argument("--output-dir", required=True, help="checkpoints, metrics.jsonl and the final model go here")
    _data_flags(p, d)
    p.add_argument("--max-target-length", type=int, default=d["max_target_length"])
    length = p.add_mutually_exclusive_group(required=True)
    length.add_argument("--max-steps", type=int, help="number of optimizer steps")
    length.add_argument("--epochs", type=float, help="passes over the training data (sets the step count)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--batch-size", type=int, help=f"examples per global batch (default {DEFAULT_BATCH_SIZE})")
    size.add_argument("--max-tokens-per-batch", type=int,
                      help="padded (source+target) tokens per global batch; batches grouped by length")
    p.add_argument("--learning-rate", type=float, default=d["learning_rate"],
                   help="peak learning rate (Adafactor's is relative to parameter scale: try 1e-3)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d["optimizer"])
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    p.add_argument("--schedule", choices=SCHEDULES, default=d["schedule"], help="decay after the linear warmup")
    p.add_argument("--warmup-steps", type=int, default=d["warmup_steps"])
    p.add_argument("--grad-accum", type=int, default=d["grad_accum"], help="global batches per optimizer step")
    p.add_argument("--clip", type=float, default=d["clip"], help="max gradient norm (0: no clipping)")
    p.add_argument("--label-smoothing", type=float, default=d["label_smoothing"])
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (weights and optimizer stay fp32)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute layer activations (saves memory)")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--eval-every", type=int, help="evaluate (and checkpoint) every N steps")
    p.add_argument("--eval-samples", type=int, default=d["eval_samples"],
                   help="also generate for the first N validation pairs and score them (ROUGE / BLEU)")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (default: --eval-every)")
    p.add_argument("--keep-best", type=int, default=d["keep_best"], metavar="K",
                   help="keep the K best checkpoints by --metric (plus the latest)")
    p.add_argument("--metric", choices=METRICS, default=d["metric"], help="validation metric ranking checkpoints")
    p.add_argument("--task", choices=("summarization", "translation"), default=d["task"])
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --output-dir (with the same options)")
    p.add_argument("--overwrite-output-dir", action="store_true",
                   help="write into a folder that holds other files (never over them, never deleting them)")
    p.add_argument("--fsdp", action="store_true", help="shard parameters with FSDP under torchrun (default DDP)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda when available)")
    p.add_argument("--save-dtype", choices=("fp32", "bf16"), default=d["save_dtype"],
                   help="dtype of the final model in --output-dir (checkpoints stay fp32)")
    p.add_argument("--log-every", type=int, default=d["log_every"], help="write a metrics.jsonl line every N steps")
    p.add_argument("--config-override", action="append", default=[], metavar="KEY=VALUE",
                   help="change a preset's config field, e.g. d_model=256 (repeatable)")
    p.add_argument("--generation-config", action="append", default=[], metavar="KEY=VALUE",
                   help="value for the saved generation_config.json, e.g. num_beams=4 (repeatable)")
    p.set_defaults(func=run_train)

    e = subparsers.add_parser("evaluate", help="generate for a dataset and score it (ROUGE or BLEU/chrF)",
                              description="Generate for every pair of --data and score against its target.")
    e.add_argument("--model", required=True, help="checkpoint folder or hub id")
    e.add_argument("--tokenizer", help="tokenizer folder (default: the checkpoint's)")
    e.add_argument("--data", required=True, help="pairs: .jsonl/.csv/.tsv/.parquet or NAME[:CONFIG][@SPLIT]")
    _data_flags(e, d)
    e.add_argument("--task", choices=("summarization", "translation"), default=d["task"])
    for name, kind in (("max_new_tokens", int), ("num_beams", int), ("length_penalty", float),
                       ("no_repeat_ngram_size", int)):
        e.add_argument("--" + name.replace("_", "-"), type=kind, help="default: the checkpoint's generation_config")
    e.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    e.add_argument("--device", help="cpu, cuda … (default: cuda when available)")
    e.add_argument("--quantize", choices=QUANTIZE_MODES, help="int8: int8 decoder and LM-head weights (CPU)")
    e.add_argument("--kv-dtype", choices=KV_CHOICES, help="generation's cross-attention keys/values in bf16 or int8 "
                   "(CPU)")
    e.add_argument("--output-dir", help="write predictions.jsonl and metrics.json here")
    e.set_defaults(func=run_evaluate)


def _data_flags(p: argparse.ArgumentParser, d: dict[str, Any]) -> None:
    p.add_argument("--source-column", default=d["source_column"], help="column of the documents")
    p.add_argument("--target-column", default=d["target_column"], help="column of the summaries / translations")
    p.add_argument("--max-source-length", type=int, default=d["max_source_length"], help="input tokens kept")


def _key_values(items: list[str], flag: str) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def options_from_args(args: argparse.Namespace) -> TrainOptions:
    """The typed options of a parsed ``train`` command line."""
    names = {f.name for f in fields(TrainOptions)} - {"config_overrides", "generation_config"}
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    values["config_overrides"] = _key_values(args.config_override, "--config-override")
    values["generation_config"] = _key_values(args.generation_config, "--generation-config")
    return TrainOptions(**values)


def run_train(args: argparse.Namespace) -> int:
    """``pegasus-x train``: print the result as JSON on stdout (rank 0)."""
    result = train(options_from_args(args))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(json_safe(asdict(result)), indent=2, allow_nan=False))
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    """``pegasus-x evaluate``: print the metrics as JSON on stdout (and write them to ``--output-dir``)."""
    from ..files import check_output_dir, check_stdout, json_text
    from ..metrics import METRICS_FILE, PREDICTIONS_FILE
    from ..tokenizer import PegasusTokenizer

    for name in ("batch_size", "max_source_length"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    check_stdout()  # before the model loads: the metrics must have somewhere to go
    if args.output_dir is not None:
        check_output_dir(args.output_dir, [args.data], flag="--output-dir", files=(PREDICTIONS_FILE, METRICS_FILE))
    device = resolve_device(args.device)
    for flag, value in (("--quantize", args.quantize), ("--kv-dtype", args.kv_dtype)):
        if value is not None and device.type != "cpu":
            raise ConfigError(f"{flag} {value} is for CPU decoding; add --device cpu")
    model = PegasusXForConditionalGeneration.from_pretrained(args.model, device=device, quantize=args.quantize,
                                                             kv_dtype=args.kv_dtype)
    tokenizer = PegasusTokenizer.from_pretrained(args.tokenizer or args.model)
    data = load_pairs(args.data, args.source_column, args.target_column)
    if data.skipped_empty:
        logger.info(data.describe())
    generation = GenerationOptions(args.max_new_tokens, args.num_beams, args.length_penalty,
                                   args.no_repeat_ngram_size)
    metrics = evaluate(model, tokenizer, data.examples, args.task, generation, batch_size=args.batch_size,
                       max_source_length=args.max_source_length, output_dir=args.output_dir)
    print(json_text(metrics, "the metrics", indent=2))
    return 0
