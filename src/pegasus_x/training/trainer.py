"""The training loop: :class:`Trainer` sets a run up and runs it, single process or ``torchrun`` (DDP / FSDP).

A *step* is one optimizer update over ``grad_accum`` global batches. Every rank computes the same batch
plan (see :mod:`pegasus_x.training.data`) and takes its shard of each global batch; the loss of a step is the sum
of token losses divided by the number of target tokens in the whole step, so a step is the same update
whatever the world size. Checkpoints (:mod:`pegasus_x.training.state`) hold the optimizer, RNG and data position,
so a resumed run continues exactly; they also record the options that exactness depends on, and a resume that
changes one is refused. Files go only where :mod:`pegasus_x.training.output` allows (never over another tool's), and
a step whose loss or gradient is not finite stops the run before it changes the model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ..config import PegasusXConfig
from ..devices import init_distributed, rank_and_world_size, resolve_device
from .data import BatchStream, DataPosition, collate, load_pairs, plan_batches, shard, tokenize_pairs
from ..errors import ConfigError, PegasusXError
from ..metrics import GenerationOptions, evaluate
from ..model import IGNORE_INDEX, shift_tokens_right
from .optim import build_optimizer, lr_at
from .options import (DEFAULT_BATCH_SIZE, METRICS, TrainOptions, changed_options, check_step_count,
                            options_record, resume_key)
from .output import STAGING, TENSORBOARD, OutputFolder, json_safe, metrics_line, open_output_folder
from .state import (STATE_JSON, STATE_PT, latest_checkpoint, load_model_and_tokenizer, rng_state,
                          set_generation_config, set_rng_state, write_model)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- loss
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

    Construction checks and locks the output folder (:func:`pegasus_x.training.output.open_output_folder`); the
    lock is held until :meth:`train` returns or raises, or until construction fails.

    Example::

        result = Trainer(TrainOptions(model="tiny", train="train.jsonl", output_dir="out", max_steps=100)).train()
    """

    def __init__(self, options: TrainOptions):
        self.options = options
        self.output_dir = Path(options.output_dir).expanduser()
        self._owns_group = init_distributed(options.device)
        self.rank, self.world_size = rank_and_world_size()
        self.output: OutputFolder | None = None
        try:
            self._setup()
        except BaseException:
            self._release()
            raise

    def _setup(self) -> None:
        o = self.options
        self.device = resolve_device(o.device)
        self.output = self._open_output()
        random.seed(o.seed)
        np.random.seed(o.seed)
        resume_from = self._resume_folder()
        # Data first: a wrong path or column should not wait for a large model to load.
        self.train_set = load_pairs(o.train, o.source_column, o.target_column)
        self.val_set = load_pairs(o.validation, o.source_column, o.target_column) if o.validation else None
        model, self.tokenizer = load_model_and_tokenizer(str(resume_from or o.model), o.tokenizer if not
                                                         resume_from else None, o.config_overrides, o.seed)
        self.config = model.config
        set_generation_config(model, o.max_target_length, o.generation_config)
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
        check_step_count(self.max_steps, f"epochs={o.epochs}")
        self.wrapped = self._wrap()
        self.optimizer = build_optimizer(self.model, o.optimizer, o.learning_rate, o.weight_decay)
        self.step, self.checkpoints, self.eval_metrics = 0, [], {}
        torch.manual_seed(o.seed + self.rank)      # dropout masks differ between ranks
        if resume_from:
            self._restore(resume_from)
        self._log_file = self._tensorboard = None

    # ------------------------------------------------------------------------------------------ setup helpers
    def _open_output(self) -> OutputFolder | None:
        """Rank 0 checks and locks the output folder; every rank raises if that failed (none waits forever)."""
        folder, failure = None, None
        if self.rank == 0:
            try:
                folder = open_output_folder(self.output_dir, self.options.model, self.options.overwrite_output_dir)
            except PegasusXError as exc:
                failure = exc
        if self.world_size > 1:
            box = [None if failure is None else str(failure)]
            dist.broadcast_object_list(box, src=0)
            if box[0] is not None and failure is None:
                raise ConfigError(box[0])
        if failure is not None:
            raise failure
        return folder

    def _release(self) -> None:
        """Unlock the output folder and leave the process group this trainer created."""
        if self.output is not None:
            self.output.close()
            self.output = None
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self._owns_group = False

    def _resume_folder(self) -> Path | None:
        found = latest_checkpoint(self.output_dir)
        if self.options.resume:
            if found is None:
                self._say(f"no checkpoint in {self.output_dir}: starting from scratch")
                return None
            stored = json.loads((found / STATE_JSON).read_text()).get("resume_key")
            if stored is None:
                raise ConfigError(f"{found} does not record the options of its run, so an exact resume cannot be "
                                  "checked; continue from it with --model in a new --output-dir")
            changes = changed_options(stored, resume_key(self.options))
            if changes:
                raise ConfigError(f"--resume: options differ from the run being resumed: {'; '.join(changes)}. "
                                  "Resume with the same options or start a new --output-dir")
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

            # Every layer is an FSDP unit of its own: its parameters are gathered only while it runs.
            for layer in (*self.model.model.encoder.layers, *self.model.model.decoder.layers):
                fully_shard(layer)
            fully_shard(self.model)
            return self.model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=ids)

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
            set_rng_state(state["rng"][self.rank])
        else:
            self._say(f"resuming a {meta['world_size']}-process run on {self.world_size}: data and optimizer "
                      "continue exactly, dropout masks do not", logging.WARNING)
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
            self._release()
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
        # The norm is needed even without clipping (max_norm inf scales by 1): a non-finite gradient is caught here.
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), o.clip if o.clip > 0 else math.inf)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        loss = float(self._all_sum(total)) / tokens
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            self._diverged(loss, grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm, tokens

    def _diverged(self, loss: float, grad_norm: float) -> None:
        """Stop a run whose step is not finite, before that step changes the model (nothing of it is saved)."""
        last = latest_checkpoint(self.output_dir)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"
        raise ConfigError(f"step {self.step + 1}: training diverged (loss {loss}, gradient norm {grad_norm}); the run "
                          f"stopped without applying the step, and {kept}. Lower --learning-rate or set --clip "
                          "(continuing from that checkpoint with --model in a new --output-dir), or check the data")

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
                                 max_source_length=self.options.max_source_length, progress=False)
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
        rng = [rng_state()]
        if self.world_size > 1:
            rng = [None] * self.world_size
            dist.all_gather_object(rng, rng_state())
        if self.rank == 0:
            value = json_safe(metrics.get(self.options.metric))
            self.checkpoints.append({"step": self.step, "metric": value})
            name = f"checkpoint-{self.step}"
            self.output.remove(f".{name}.tmp")
            staging = self.output.claim(f".{name}.tmp")
            write_model(weights, self.config, self.model.generation_config, self.tokenizer, staging,
                        torch.float32)
            meta = {"step": self.step, "position": self.stream.position.to_dict(), "world_size": self.world_size,
                    "eval_metrics": metrics, "checkpoints": self.checkpoints, "options": options_record(self.options),
                    "resume_key": resume_key(self.options)}
            torch.save({"optimizer": optim, "rng": rng}, staging / STATE_PT)
            (staging / STATE_JSON).write_text(json.dumps(json_safe(meta), indent=2, allow_nan=False, default=str)
                                              + "\n")
            self.output.remove(name)
            os.replace(staging, self.output.claim(name))    # the folder appears complete or not at all
            self.output.remove(staging.name)                # gone already: only the manifest changes
            self._prune()
        if self.world_size > 1:
            dist.barrier()

    def _prune(self) -> None:
        """Keep the ``keep_best`` best checkpoints by the metric (or the newest ones without it) and the latest."""
        scored = [c for c in self.checkpoints if c["metric"] is not None]
        if scored:
            lower_is_better = self.options.metric == "loss"
            ranked = sorted(scored, key=lambda c: (c["metric"] if lower_is_better else -c["metric"], -c["step"]))
        else:
            ranked = sorted(self.checkpoints, key=lambda c: -c["step"])
        keep_steps = {c["step"] for c in ranked[:self.options.keep_best]} | {self.step}
        for c in list(self.checkpoints):
            if c["step"] not in keep_steps:
                self.output.remove(f"checkpoint-{c['step']}")
                self.checkpoints.remove(c)

    def _save_final(self) -> None:
        """The final model in checkpoint layout directly in ``output_dir`` (each file replaced atomically)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        weights = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank == 0:
            self.output.remove(".final.tmp")
            staging = self.output.claim(".final.tmp")
            dtype = torch.bfloat16 if self.options.save_dtype == "bf16" else torch.float32
            write_model(weights, self.config, self.model.generation_config, self.tokenizer, staging, dtype)
            for file in staging.iterdir():
                os.replace(file, self.output.claim(file.name))
            self.output.remove(staging.name)
        if self.world_size > 1:
            dist.barrier()

    # ------------------------------------------------------------------------------------------ logging
    def _open_logs(self) -> None:
        if self.rank != 0:
            return
        for stale in sorted(self.output.owned):   # staging folders left by a run killed mid-save
            if STAGING.match(stale):
                self.output.remove(stale)
        self._log_file = self.output.open_metrics_log(self.step)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:                       # TensorBoard is optional
            return
        self._tensorboard = SummaryWriter(str(self.output.claim(TENSORBOARD)))

    def _record(self, entry: dict[str, Any]) -> None:
        if self._log_file is None:
            return
        self._log_file.write(metrics_line(entry))
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

    def _say(self, message: str, level: int = logging.INFO) -> None:
        """Progress and notes through the ``pegasus_x`` logger (rank 0 only: one line per run, not per process)."""
        if self.rank == 0:
            logger.log(level, message)


def _to(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
