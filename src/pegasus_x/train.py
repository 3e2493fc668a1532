"""Fine-tuning: one explicit training loop, single process or ``torchrun`` (DDP / FSDP), resumable exactly.

A *step* is one optimizer update over ``grad_accum`` global batches. Every rank computes the same batch
plan (see :mod:`pegasus_x.data`) and takes its shard of each global batch; the loss of a step is the sum
of token losses divided by the number of target tokens in the whole step, so a step is the same update
whatever the world size. Checkpoints are folders ``checkpoint-{step}`` in the Hugging Face layout plus
``trainer_state.json`` (step, data position, metrics) and ``trainer_state.pt`` (optimizer and RNG states),
written into a temporary folder and renamed, so a run killed at any moment leaves the previous one intact.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .config import PegasusXConfig
from .data import BatchStream, DataPosition, collate, load_pairs, plan_batches, shard, tokenize_pairs
from .errors import ConfigError
from .metrics import ROUGE_KEYS, GenerationOptions, evaluate
from .model import IGNORE_INDEX, PegasusXForConditionalGeneration, shift_tokens_right

PRESETS = {"tiny": PegasusXConfig.tiny, "base": PegasusXConfig.base, "large": PegasusXConfig.large}
OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("constant", "linear", "cosine", "rsqrt")
METRICS = ("loss",) + ROUGE_KEYS + ("bleu", "chrf")
STATE_JSON, STATE_PT, METRICS_LOG = "trainer_state.json", "trainer_state.pt", "metrics.jsonl"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
DEFAULT_BATCH_SIZE = 8   # used when neither batch_size nor max_tokens_per_batch is set


# ---------------------------------------------------------------------------------------------------- options
@dataclass
class TrainOptions:
    """Everything a training run needs; the ``train`` command builds one from its flags.

    ``model`` is a checkpoint folder, a hub id, or a preset (``tiny``/``base``/``large``, random init, shaped
    by ``config_overrides``). Exactly one of ``max_steps``/``epochs`` is required; ``batch_size`` and
    ``max_tokens_per_batch`` are exclusive (neither: ``DEFAULT_BATCH_SIZE``).
    """

    model: str
    train: str
    output_dir: str
    tokenizer: str | None = None
    validation: str | None = None
    source_column: str = "source"
    target_column: str = "target"
    max_source_length: int = 16384
    max_target_length: int = 256
    max_steps: int | None = None
    epochs: float | None = None
    batch_size: int | None = None
    max_tokens_per_batch: int | None = None
    learning_rate: float = 1e-4
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_steps: int = 0
    grad_accum: int = 1
    clip: float = 1.0
    label_smoothing: float = 0.0
    bf16: bool = False
    gradient_checkpointing: bool = False
    seed: int = 0
    eval_every: int | None = None
    eval_samples: int = 0
    save_every: int | None = None
    keep_best: int = 1
    metric: str = "loss"
    task: str = "summarization"
    resume: bool = False
    fsdp: bool = False
    device: str | None = None
    save_dtype: str = "fp32"
    log_every: int = 10
    config_overrides: dict[str, Any] = field(default_factory=dict)
    generation_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.max_steps is None) == (self.epochs is None):
            raise ConfigError("give exactly one of max_steps (--max-steps) or epochs (--epochs)")
        if self.batch_size is not None and self.max_tokens_per_batch is not None:
            raise ConfigError("batch_size and max_tokens_per_batch exclude each other; give one")
        for name in ("max_steps", "batch_size", "max_tokens_per_batch", "eval_every", "save_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        for name in ("grad_accum", "keep_best", "log_every", "max_source_length", "max_target_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        choices = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES, "metric": METRICS,
                   "task": ("summarization", "translation"), "save_dtype": ("fp32", "bf16")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is unknown; use one of {', '.join(allowed)}")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"epochs must be positive, got {self.epochs}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.learning_rate <= 0 or self.warmup_steps < 0 or self.clip < 0:
            raise ConfigError("learning_rate must be positive, warmup_steps and clip non-negative")
        if self.metric != "loss" and self.eval_samples < 1:
            raise ConfigError(f"metric {self.metric!r} is computed on generated samples: set eval_samples "
                              "(--eval-samples N) or use --metric loss")
        if self.fsdp and (self.optimizer == "adafactor" or self.eval_samples):
            raise ConfigError("with --fsdp use --optimizer adamw (torch's Adafactor cannot update sharded "
                              "parameters) and --eval-samples 0 (generate from a saved checkpoint instead)")
        if self.config_overrides and self.model not in PRESETS:
            raise ConfigError(f"config overrides shape a new model; they need a preset ({', '.join(PRESETS)}), "
                              f"not the checkpoint {self.model!r}")


# ---------------------------------------------------------------------------------------------------- pure parts
def lr_at(step: int, peak: float, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    Warmup: ``peak · (step + 1) / warmup_steps`` for ``step < warmup_steps``. After it, with
    ``s = step - warmup_steps`` and ``n = total_steps - warmup_steps``: ``constant`` → peak; ``linear`` →
    ``peak · (1 - s / n)``; ``cosine`` → ``peak · (1 + cos(π s / n)) / 2``; ``rsqrt`` → ``peak ·
    sqrt(max(warmup_steps, 1) / max(step + 1, warmup_steps, 1))`` (1/√step decay after warmup).
    """
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    s, n = step - warmup_steps, max(total_steps - warmup_steps, 1)
    if schedule == "constant":
        return peak
    if schedule == "linear":
        return peak * max(0.0, 1.0 - s / n)
    if schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * min(s, n) / n))
    if schedule == "rsqrt":
        return peak * math.sqrt(max(warmup_steps, 1) / max(step + 1, warmup_steps, 1))
    raise ConfigError(f"schedule {schedule!r} is unknown; use one of {', '.join(SCHEDULES)}")


def label_smoothed_loss(logits: Tensor, labels: Tensor, smoothing: float) -> Tensor:
    """Summed (not averaged) token loss ``(1-ε)·NLL + ε·mean_v(-log p_v)`` over labels ≠ -100, in fp32.

    Args:
        logits: ``(B, T, V)``.
        labels: ``(B, T)``, -100 where ignored.
        smoothing: ε in [0, 1).
    """
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum", label_smoothing=smoothing)


def token_loss(model: torch.nn.Module, batch: dict[str, Tensor], config: PegasusXConfig, smoothing: float
               ) -> Tensor:
    """Forward pass on a collated batch and the summed label-smoothed loss of its target tokens."""
    decoder_input_ids = shift_tokens_right(batch["labels"], config.pad_token_id, config.decoder_start_token_id)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                decoder_input_ids=decoder_input_ids)
    return label_smoothed_loss(out.logits, batch["labels"], smoothing)


# ---------------------------------------------------------------------------------------------------- loading
def load_model_and_tokenizer(spec: str, tokenizer: str | None = None, overrides: dict[str, Any] | None = None,
                             seed: int = 0) -> tuple[PegasusXForConditionalGeneration, Any]:
    """A model to train and its tokenizer.

    Args:
        spec: checkpoint folder, hub id, or preset name (random init; vocab_size follows the tokenizer).
        tokenizer: tokenizer folder; default: the checkpoint's own, or the shipped PEGASUS vocabulary for presets.
        overrides: config fields changed on a preset.
        seed: seed of the random initialisation.
    Raises:
        ConfigError / CheckpointError / TokenizerError: bad preset overrides or unreadable files.
    """
    from .tokenizer import PegasusTokenizer

    if spec in PRESETS:
        tok = PegasusTokenizer.from_pretrained(tokenizer) if tokenizer else PegasusTokenizer.pegasus()
        try:
            config = PRESETS[spec](**{"vocab_size": tok.vocab_size, **(overrides or {})})
        except TypeError as exc:
            raise ConfigError(f"bad config override: {exc}") from None
        torch.manual_seed(seed)
        return PegasusXForConditionalGeneration(config), tok
    model = PegasusXForConditionalGeneration.from_pretrained(spec, dtype=torch.float32)
    return model, PegasusTokenizer.from_pretrained(tokenizer or spec)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete ``checkpoint-{step}`` folder with the highest step, or None."""
    folder = Path(output_dir)
    found = [(int(m.group(1)), p) for p in folder.glob("checkpoint-*")
             if (m := CHECKPOINT.match(p.name)) and (p / STATE_JSON).is_file() and (p / STATE_PT).is_file()]
    return max(found)[1] if found else None


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------------- trainer
@dataclass
class TrainResult:
    """Outcome of :meth:`Trainer.train`: the last step, its training loss, the last evaluation, kept checkpoints."""

    step: int
    train_loss: float | None
    eval_metrics: dict[str, Any]
    checkpoints: list[dict[str, Any]]
    output_dir: str


class Trainer:
    """Sets a run up (process group, data, model, optimizer, resume) and runs it with :meth:`train`.

    Example::

        result = Trainer(TrainOptions(model="tiny", train="train.jsonl", output_dir="out", max_steps=100)).train()
    """

    def __init__(self, options: TrainOptions):
        self.options = o = options
        self.output_dir = Path(o.output_dir)
        self._owns_group = _init_distributed()
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.device = _device(o.device)
        random.seed(o.seed)
        np.random.seed(o.seed)
        resume_from = self._resume_folder()
        # Data first: a wrong path or column should not wait for a large model to load.
        self.train_set = load_pairs(o.train, o.source_column, o.target_column)
        self.val_set = load_pairs(o.validation, o.source_column, o.target_column) if o.validation else None
        model, self.tokenizer = load_model_and_tokenizer(str(resume_from or o.model), o.tokenizer if not
                                                         resume_from else None, o.config_overrides, o.seed)
        self.config = model.config
        model.generation_config = {**_default_generation(self.config, o.max_target_length),
                                   **model.generation_config, **o.generation_config}
        if o.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.model = model.to(self.device).train()
        self.train_pairs = tokenize_pairs(self.train_set.examples, self.tokenizer, o.max_source_length,
                                          o.max_target_length)
        self.val_pairs = (tokenize_pairs(self.val_set.examples, self.tokenizer, o.max_source_length,
                                         o.max_target_length) if self.val_set else None)
        limits = dict(batch_size=o.batch_size or (None if o.max_tokens_per_batch else DEFAULT_BATCH_SIZE),
                      max_tokens=o.max_tokens_per_batch)
        self.stream = BatchStream(self.train_pairs, seed=o.seed, **limits)
        self.limits = limits
        self.max_steps = o.max_steps or math.ceil(o.epochs * len(self.stream.plan(0)) / o.grad_accum)
        self.wrapped = self._wrap()
        self.optimizer = self._build_optimizer()
        self.step, self.checkpoints, self.eval_metrics = 0, [], {}
        torch.manual_seed(o.seed + self.rank)      # dropout masks differ between ranks
        if resume_from:
            self._restore(resume_from)
        self._log_file = self._tensorboard = None

    # ------------------------------------------------------------------------------------------ setup helpers
    def _resume_folder(self) -> Path | None:
        found = latest_checkpoint(self.output_dir)
        if self.options.resume:
            if found is None:
                self._say(f"no checkpoint in {self.output_dir}: starting from scratch")
            return found
        if found is not None:
            raise ConfigError(f"{self.output_dir} already holds {found.name}; pass --resume to continue that run "
                              "or choose another --output-dir")
        return None

    def _wrap(self) -> torch.nn.Module:
        if self.world_size == 1:
            return self.model
        if self.options.fsdp:
            from torch.distributed.fsdp import fully_shard

            # Encoder layers are FSDP units of their own. The decoder stays in the root unit: it projects the
            # cross-attention keys/values of all its layers before the layer loop, outside their forward hooks.
            for layer in self.model.model.encoder.layers:
                fully_shard(layer)
            fully_shard(self.model)
            return self.model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=ids)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        o = self.options
        params = [p for p in self.model.parameters() if p.requires_grad]
        if o.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=o.learning_rate, weight_decay=o.weight_decay)
        if not hasattr(torch.optim, "Adafactor"):
            raise ConfigError("--optimizer adafactor needs torch >= 2.5 (torch.optim.Adafactor); use adamw")
        # torch's Adafactor is the paper's: factored second moments, no momentum, update clipping, and steps
        # relative to each parameter's RMS — so its learning rate is ~10x AdamW's (e.g. 1e-3).
        return torch.optim.Adafactor(params, lr=o.learning_rate, weight_decay=o.weight_decay)

    def _restore(self, folder: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        meta = json.loads((folder / STATE_JSON).read_text())
        state = torch.load(folder / STATE_PT, map_location="cpu", weights_only=True)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=self.options.fsdp and self.world_size > 1))
        self.step = meta["step"]
        self.stream.position = DataPosition.from_dict(meta["position"])
        self.checkpoints, self.eval_metrics = meta["checkpoints"], meta.get("eval_metrics", {})
        if meta["world_size"] == self.world_size:
            _set_rng_state(state["rng"][self.rank])
        else:
            self._say(f"resuming a {meta['world_size']}-process run on {self.world_size}: data and optimizer "
                      "continue exactly, dropout masks do not")
        self._say(f"resumed from {folder} at step {self.step}")

    # ------------------------------------------------------------------------------------------ the loop
    def train(self) -> TrainResult:
        """Run until ``max_steps``; returns a :class:`TrainResult`. Rank 0 writes every file."""
        from tqdm.auto import tqdm

        o = self.options
        self._say(f"{self.train_set.describe()}; {self.max_steps} steps of {o.grad_accum} global batch(es); "
                  f"{self.model.num_parameters():,} parameters on {self.device} x{self.world_size}")
        if self.val_set:
            self._say(f"validation {self.val_set.describe()}")
        self._open_logs()
        bar = tqdm(total=self.max_steps, initial=self.step, desc="train", file=sys.stderr, dynamic_ncols=True,
                   disable=self.rank != 0 or not sys.stderr.isatty())
        loss, started = None, time.perf_counter()
        try:
            while self.step < self.max_steps:
                batches = [next(self.stream) for _ in range(o.grad_accum)]
                loss, grad_norm, tokens = self._train_step(batches)
                self.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if self.step % o.log_every == 0 or self.step == self.max_steps:
                    self._record({"split": "train", "step": self.step, "epoch": self.stream.position.epoch,
                                  "loss": loss, "grad_norm": grad_norm, "tokens": tokens,
                                  "lr": self.optimizer.param_groups[0]["lr"],
                                  "elapsed_s": round(time.perf_counter() - started, 3)})
                last = self.step == self.max_steps
                evaluate_now = self.val_set is not None and o.eval_every and (self.step % o.eval_every == 0 or last)
                if evaluate_now:
                    self.eval_metrics = self._evaluate()
                    self._record({"split": "validation", "step": self.step, **self.eval_metrics})
                    self._say(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in self.eval_metrics.items()))
                save_every = o.save_every or o.eval_every
                if evaluate_now or last or (save_every and self.step % save_every == 0):
                    self._save_checkpoint(self.eval_metrics if evaluate_now else {})
            self._save_final()
        finally:
            bar.close()
            self._close_logs()
            if self._owns_group:
                dist.destroy_process_group()
        return TrainResult(self.step, loss, self.eval_metrics, self.checkpoints, str(self.output_dir))

    def _train_step(self, batches: list[list[int]]) -> tuple[float, float | None, int]:
        """One optimizer update over the global ``batches``; returns (mean token loss, grad norm, tokens)."""
        o = self.options
        lr = lr_at(self.step, o.learning_rate, o.schedule, o.warmup_steps, self.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        tokens = sum(len(self.train_pairs.target_ids[i]) for batch in batches for i in batch)
        # DDP and FSDP average gradients over ranks; × world_size turns that into the sum over the step.
        scale = self.world_size / tokens
        total = torch.zeros((), dtype=torch.float64)
        for k, batch in enumerate(batches):
            local = shard(batch, self.rank, self.world_size)
            # A rank without examples still runs forward/backward (collectives) on one example, weighted 0.
            weight = scale if local else 0.0
            inputs = _to(collate(self.train_pairs, local or batch[:1], self.config.pad_token_id), self.device)
            with self._gradient_sync(k == len(batches) - 1):
                with self._autocast():
                    loss_sum = token_loss(self.wrapped, inputs, self.config, o.label_smoothing)
                (loss_sum * weight).backward()
            total += loss_sum.detach().double().cpu() * (1.0 if local else 0.0)
        grad_norm = None
        if o.clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), o.clip)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(self._all_sum(total)) / tokens, grad_norm, tokens

    @contextlib.contextmanager
    def _gradient_sync(self, sync: bool) -> Iterator[None]:
        """Skip the gradient all-reduce on all but the last micro-batch of a step (the result is the same)."""
        if self.world_size > 1 and self.options.fsdp:
            self.model.set_requires_gradient_sync(sync)
            yield
        elif self.world_size > 1 and not sync:
            with self.wrapped.no_sync():
                yield
        else:
            yield

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.options.bf16)

    def _all_sum(self, value: Tensor) -> Tensor:
        if self.world_size == 1:
            return value
        device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        value = value.to(device)
        dist.all_reduce(value)
        return value.cpu()

    # ------------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def _evaluate(self) -> dict[str, float]:
        """Validation loss (plain cross-entropy per target token) and, with ``eval_samples``, generated-text scores."""
        self.model.eval()
        sums = torch.zeros(2, dtype=torch.float64)
        plan = plan_batches(*self.val_pairs.lengths(), shuffle=False, **self.limits)
        for batch in plan:
            local = shard(batch, self.rank, self.world_size)
            inputs = _to(collate(self.val_pairs, local or batch[:1], self.config.pad_token_id), self.device)
            with self._autocast():
                loss_sum = token_loss(self.wrapped, inputs, self.config, 0.0)
            if local:
                sums += torch.tensor([loss_sum.item(), int((inputs["labels"] != IGNORE_INDEX).sum())])
        total, count = self._all_sum(sums).tolist()
        metrics = {"loss": total / count}
        if self.options.eval_samples:
            metrics.update(self._generated_scores())
        self.model.train()
        return metrics

    def _generated_scores(self) -> dict[str, float]:
        """Scores of generated outputs on the first ``eval_samples`` validation pairs (rank 0 generates)."""
        scores = torch.zeros(len(METRICS) - 1, dtype=torch.float64)
        if self.rank == 0:
            examples = self.val_set.examples[:self.options.eval_samples]
            generation = GenerationOptions(max_new_tokens=self.model.generation_config.get("max_new_tokens"))
            with self._autocast():
                found = evaluate(self.model, self.tokenizer, examples, self.options.task, generation,
                                 max_source_length=self.options.max_source_length)
            scores = torch.tensor([found.get(name, math.nan) for name in METRICS[1:]], dtype=torch.float64)
        if self.world_size > 1:                      # everyone logs and ranks checkpoints by the same numbers
            device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
            scores = scores.to(device)
            dist.broadcast(scores, 0)
        return {name: v for name, v in zip(METRICS[1:], scores.tolist()) if not math.isnan(v)}

    # ------------------------------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, metrics: dict[str, float]) -> None:
        """Write ``checkpoint-{step}`` (all ranks take part in gathering; rank 0 writes) and prune old ones."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        weights, optim = get_state_dict(self.model, self.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        rng = [_rng_state()]
        if self.world_size > 1:
            rng = [None] * self.world_size
            dist.all_gather_object(rng, _rng_state())
        if self.rank == 0:
            value = metrics.get(self.options.metric)
            self.checkpoints.append({"step": self.step, "metric": value})
            staging = self.output_dir / f".checkpoint-{self.step}.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            self._write_model(weights, staging, torch.float32)
            meta = {"step": self.step, "position": self.stream.position.to_dict(), "world_size": self.world_size,
                    "eval_metrics": metrics, "checkpoints": self.checkpoints, "options": asdict(self.options)}
            torch.save({"optimizer": optim, "rng": rng}, staging / STATE_PT)
            (staging / STATE_JSON).write_text(json.dumps(meta, indent=2, default=str) + "\n")
            final = self.output_dir / f"checkpoint-{self.step}"
            shutil.rmtree(final, ignore_errors=True)
            os.replace(staging, final)        # the folder appears complete or not at all
            self._prune()
        if self.world_size > 1:
            dist.barrier()

    def _write_model(self, weights: dict[str, Tensor], folder: Path, dtype: torch.dtype) -> None:
        """config.json, model.safetensors, generation_config.json and the tokenizer files into ``folder``."""
        with torch.device("meta"):
            model = PegasusXForConditionalGeneration(self.config, init=False)
        missing, _ = model.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, strict=False, assign=True)
        model.tie_weights()
        if set(missing) - {"model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight",
                           "lm_head.weight"}:
            raise ConfigError(f"internal: gathered weights lack {sorted(missing)[:5]}")
        model.generation_config = dict(self.model.generation_config)
        model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

    def _prune(self) -> None:
        """Keep the ``keep_best`` best checkpoints by the metric (or the newest ones without it) and the latest."""
        scored = [c for c in self.checkpoints if c["metric"] is not None]
        if scored:
            lower_is_better = self.options.metric == "loss"
            ranked = sorted(scored, key=lambda c: (c["metric"] if lower_is_better else -c["metric"], -c["step"]))
        else:
            ranked = sorted(self.checkpoints, key=lambda c: -c["step"])
        keep = {c["step"] for c in ranked[:self.options.keep_best]} | {self.step}
        for c in list(self.checkpoints):
            if c["step"] not in keep:
                shutil.rmtree(self.output_dir / f"checkpoint-{c['step']}", ignore_errors=True)
                self.checkpoints.remove(c)

    def _save_final(self) -> None:
        """The final model in checkpoint layout directly in ``output_dir`` (each file replaced atomically)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        weights = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank == 0:
            staging = self.output_dir / ".final.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            dtype = torch.bfloat16 if self.options.save_dtype == "bf16" else torch.float32
            self._write_model(weights, staging, dtype)
            for file in staging.iterdir():
                os.replace(file, self.output_dir / file.name)
            staging.rmdir()
        if self.world_size > 1:
            dist.barrier()

    # ------------------------------------------------------------------------------------------ logging
    def _open_logs(self) -> None:
        if self.rank != 0:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.output_dir.glob(".checkpoint-*.tmp"):   # left by a run killed mid-save
            shutil.rmtree(stale, ignore_errors=True)
        self._log_file = open(self.output_dir / METRICS_LOG, "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:                       # TensorBoard is optional
            return
        self._tensorboard = SummaryWriter(str(self.output_dir / "tensorboard"))

    def _record(self, entry: dict[str, Any]) -> None:
        if self._log_file is None:
            return
        self._log_file.write(json.dumps(entry) + "\n")
        self._log_file.flush()
        if self._tensorboard is not None:
            for key, value in entry.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tensorboard.add_scalar(f"{entry['split']}/{key}", value, entry["step"])

    def _close_logs(self) -> None:
        for handle in (self._log_file, self._tensorboard):
            if handle is not None:
                handle.close()
        self._log_file = self._tensorboard = None

    def _say(self, message: str) -> None:
        if self.rank == 0:
            print(f"[train] {message}", file=sys.stderr, flush=True)


def train(options: TrainOptions) -> TrainResult:
    """Run a training job (see :class:`Trainer`)."""
    return Trainer(options).train()


def _init_distributed() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); True when this call created it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def _device(requested: str | None) -> torch.device:
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _to(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _default_generation(config: PegasusXConfig, max_target_length: int) -> dict[str, Any]:
    """generation_config.json of a model trained here, unless the checkpoint or the options say otherwise."""
    return {"decoder_start_token_id": config.decoder_start_token_id, "eos_token_id": config.eos_token_id,
            "pad_token_id": config.pad_token_id, "forced_eos_token_id": config.forced_eos_token_id,
            "num_beams": 4, "length_penalty": 0.8, "max_new_tokens": max_target_length}


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
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
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
        print(json.dumps(asdict(result), indent=2))
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    """``pegasus-x evaluate``: print the metrics as JSON on stdout."""
    from .tokenizer import PegasusTokenizer

    device = _device(args.device)
    model = PegasusXForConditionalGeneration.from_pretrained(args.model, device=device)
    tokenizer = PegasusTokenizer.from_pretrained(args.tokenizer or args.model)
    data = load_pairs(args.data, args.source_column, args.target_column)
    if data.skipped_empty:
        print(f"[evaluate] {data.describe()}", file=sys.stderr)
    generation = GenerationOptions(args.max_new_tokens, args.num_beams, args.length_penalty,
                                   args.no_repeat_ngram_size)
    metrics = evaluate(model, tokenizer, data.examples, args.task, generation, batch_size=args.batch_size,
                       max_source_length=args.max_source_length, output_dir=args.output_dir)
    print(json.dumps(metrics, indent=2))
    return 0
