"""Scores for generated text: ROUGE for summaries, BLEU and chrF for translations, and `evaluate`.

ROUGE follows the long-document papers: ``rouge-score`` with ``use_stemmer=True``; ROUGE-Lsum splits
summaries into sentences only at newlines, so predictions and references are first put one sentence
per line by the package's splitter (:mod:`pegasus_x.sentences`, which knows "Dr.", "e.g.", "Fig. 3").
Scores are F-measures in percent, averaged over examples. BLEU and chrF are corpus-level ``sacrebleu`` scores.
Both packages are imported only when used (``pip install 'pegasus-x[eval]'``).
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import DataError, InputError
from .files import atomic_write_bytes, check_output_dir, json_text
from .sentences import split_sentences

TASKS = ("summarization", "translation")
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
PREDICTIONS_FILE = "predictions.jsonl"
METRICS_FILE = "metrics.json"


def sentence_per_line(text: str) -> str:
    """Put each sentence on its own line (:func:`pegasus_x.sentences.split_sentences`), as ROUGE-Lsum wants."""
    return "\n".join(split_sentences(text))


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F-measures (percent) of paired predictions and references.

    Raises:
        InputError: the lists differ in length or are empty.
        DataError: ``rouge-score`` is not installed.
    """
    _check_pairs(predictions, references)
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise DataError("ROUGE needs the rouge-score package: pip install 'pegasus-x[eval]'") from None
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_KEYS, 0.0)
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(sentence_per_line(reference), sentence_per_line(prediction))
        for key in ROUGE_KEYS:
            totals[key] += scores[key].fmeasure
    return {key: 100.0 * value / len(predictions) for key, value in totals.items()}


def bleu_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu defaults, one reference per prediction).

    Raises:
        InputError: the lists differ in length or are empty.
        DataError: ``sacrebleu`` is not installed.
    """
    _check_pairs(predictions, references)
    try:
        import sacrebleu
    except ImportError:
        raise DataError("BLEU and chrF need the sacrebleu package: pip install 'pegasus-x[eval]'") from None
    return {"bleu": sacrebleu.corpus_bleu(list(predictions), [list(references)]).score,
            "chrf": sacrebleu.corpus_chrf(list(predictions), [list(references)]).score}


def score(task: str, predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """ROUGE for ``summarization``, BLEU + chrF for ``translation``."""
    if task not in TASKS:
        raise InputError(f"task {task!r} is unknown; use one of {TASKS}")
    return rouge_scores(predictions, references) if task == "summarization" else bleu_scores(predictions,
                                                                                             references)


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise InputError(f"{len(predictions)} predictions but {len(references)} references; they must pair up")
    if not predictions:
        raise InputError("nothing to score: no predictions")


# ---------------------------------------------------------------------------------------------------- evaluate
@dataclass
class GenerationOptions:
    """Decoding options for evaluation; None leaves the choice to the checkpoint's generation_config.json
    (and to ``generate``'s defaults where that file is silent)."""

    max_new_tokens: int | None = None
    num_beams: int | None = None
    length_penalty: float | None = None
    no_repeat_ngram_size: int | None = None

    def as_kwargs(self) -> dict[str, Any]:
        """The keyword arguments for ``model.generate``: the options that were set."""
        return {key: value for key, value in asdict(self).items() if value is not None}


@torch.inference_mode()
def generate_texts(model: Any, tokenizer: Any, sources: Sequence[str], generation: dict[str, Any], *,
                   batch_size: int = 8, max_source_length: int | None = None, progress: bool = True) -> list[str]:
    """Generate one text per source, batching sources of similar length together.

    Args:
        model: a :class:`~pegasus_x.PegasusXForConditionalGeneration` (any device and dtype).
        tokenizer: the model's tokenizer.
        sources: input documents.
        generation: keyword arguments of ``model.generate``.
        batch_size: documents per ``generate`` call.
        max_source_length: truncate inputs to this many tokens (default: the tokenizer's limit).
        progress: show a progress bar (documents done) on stderr when it is a terminal, like ``summarize``.
    Returns:
        The decoded outputs, in the order of ``sources``.
    """
    from tqdm.auto import tqdm

    from .summarize import generate_rows

    was_training = model.training
    model.eval()
    rows = tokenizer(list(sources), max_length=max_source_length, truncation=True)["input_ids"]
    bar = tqdm(total=len(sources), unit="doc", desc="evaluate", file=sys.stderr, leave=False,
               disable=not progress or not sys.stderr.isatty())
    try:
        outputs, _ = generate_rows(model, tokenizer, rows, generation, batch_size=batch_size, progress=bar.update)
    finally:
        bar.close()
        model.train(was_training)
    return outputs


def evaluate(model: Any, tokenizer: Any, examples: Any, task: str = "summarization",
             generation: GenerationOptions | None = None, *, batch_size: int = 8,
             max_source_length: int | None = None, output_dir: str | Path | None = None,
             source_column: str = "source", target_column: str = "target", progress: bool = True
             ) -> dict[str, Any]:
    """Generate for every example and score against its target.

    Args:
        model, tokenizer: the checkpoint to evaluate.
        examples: :class:`~pegasus_x.training.data.Example` pairs (``.source``, ``.target``), or anything
            :func:`pegasus_x.training.data.load_pairs` reads: a data file, a ``datasets.Dataset`` (one split of a
            ``DatasetDict``), a dataset folder or name.
        source_column, target_column: the columns of ``examples`` when it is read by ``load_pairs``.
        progress: show a progress bar on stderr when it is a terminal.
        task: ``summarization`` (ROUGE-1/2/L/Lsum) or ``translation`` (BLEU, chrF).
        generation: decoding options (unset ones: the checkpoint's generation_config.json).
        batch_size: documents per ``generate`` call.
        max_source_length: input truncation in tokens.
        output_dir: when given, ``predictions.jsonl`` (source, reference, prediction per line) and
            ``metrics.json`` are written there atomically.
    Returns:
        The metrics (percent) plus ``count``, ``task`` and ``generation``: the checkpoint's generation_config
        updated with the options given.
    Raises:
        InputError: unknown task, no examples, an ``output_dir`` that cannot be written (checked before
            generating), or a non-finite metric (JSON cannot hold it).
        DataError: ``examples`` could not be read (see :func:`pegasus_x.training.data.load_pairs`).
    """
    from .training.data import load_pairs

    if isinstance(examples, (str, os.PathLike)) or hasattr(examples, "column_names"):   # a file or a Dataset
        examples = load_pairs(examples, source_column, target_column).examples

    if task not in TASKS:
        raise InputError(f"task {task!r} is unknown; use one of {TASKS}")
    if not examples:
        raise InputError("nothing to evaluate: the dataset is empty")
    if output_dir is not None:
        check_output_dir(output_dir, flag="output_dir", files=(PREDICTIONS_FILE, METRICS_FILE))
    options = (generation or GenerationOptions()).as_kwargs()
    predictions = generate_texts(model, tokenizer, [e.source for e in examples], options, batch_size=batch_size,
                                 max_source_length=max_source_length, progress=progress)
    references = [e.target for e in examples]
    metrics: dict[str, Any] = {**score(task, predictions, references), "count": len(examples), "task": task,
                               "generation": {**(getattr(model, "generation_config", None) or {}), **options}}
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        lines = [json_text({"source": e.source, "reference": e.target, "prediction": p}, "a prediction",
                           ensure_ascii=False) for e, p in zip(examples, predictions)]
        text = json_text(metrics, "the metrics", indent=2)  # both files prepared before either is written
        atomic_write_bytes(out / PREDICTIONS_FILE, ("\n".join(lines) + "\n").encode("utf-8"))
        atomic_write_bytes(out / METRICS_FILE, (text + "\n").encode("utf-8"))
    return metrics
