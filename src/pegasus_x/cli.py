"""The `pegasus-x` command: `summarize` and `info` here; other modules plug in their own subcommands.

Every subcommand parses into a typed options dataclass and returns an exit status. Errors a user can cause
raise :class:`~pegasus_x.errors.PegasusXError`; :func:`main` prints them as one ``pegasus-x: error: ...`` line
and exits with status 2, like argparse's own usage errors. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

from .errors import InputError, PegasusXError
from .documents import MAX_INPUT_BYTES, TEXT_FIELD, Document, read_documents
from .files import SIGPIPE_STATUS, atomic_write_bytes, check_output, check_stdout, guarded_stdio, json_text
from .quantize import KV_CHOICES
from .quantize import MODES as QUANTIZE_MODES

PROG = "pegasus-x"
# Modules that add subcommands through `register(subparsers)`; each sets `func=` (args -> exit status).
_PLUGINS = ("pegasus_x.training.commands", "pegasus_x.convert", "pegasus_x.pretraining", "pegasus_x.serve")
# Generation flags of `summarize`: flag dest == generate() option name; None means "the checkpoint's default".
GENERATION_FLAGS = ("max_new_tokens", "min_new_tokens", "num_beams", "length_penalty", "no_repeat_ngram_size",
                    "prompt_lookup_num_tokens")


# ---------------------------------------------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> int:
    """Run the `pegasus-x` command line.

    Args:
        argv: the arguments after the program name (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 for a usage error or a :class:`PegasusXError` (stdout that cannot be
        written included: closed, or on a full disk), 130 on Ctrl-C, and 141 when the reader of stdout went away
        (``| head``): what a shell reports for a program killed by SIGPIPE, without a traceback. SIGPIPE itself
        stays ignored, because dying of it would leave an output's temporary file behind.
    """
    with guarded_stdio() as stdout:
        try:
            status = _dispatch(argv)
            sys.stdout.flush()  # a full disk under stdout shows here, not in the interpreter's exit
            return status
        except PegasusXError as exc:
            message = " ".join(str(exc).split())
            print(f"{PROG}: error: {message}", file=sys.stderr)
            return 2
        except BrokenPipeError:
            if stdout is None or not stdout.broken:
                raise
            return SIGPIPE_STATUS
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130


def _dispatch(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help / --version (0) and usage errors (2), already printed by argparse
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    with warnings.catch_warnings(), _log_to_stderr():
        warnings.showwarning = _show_warning
        return args.func(args)


def build_parser() -> argparse.ArgumentParser:
    """The parser with every subcommand: the built-in ones and those of the installed plugin modules."""
    from . import __version__

    parser = argparse.ArgumentParser(prog=PROG, description="PEGASUS-X long-document summarization.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    _register_summarize(subparsers)
    _register_info(subparsers)
    for name in _PLUGINS:
        importlib.import_module(name).register(subparsers)
    return parser


def _show_warning(message: Warning | str, category: type, filename: str, lineno: int, file: Any = None,
                  line: str | None = None) -> None:
    """Warnings as one line, like errors (the default format adds a file name and a source line)."""
    print(f"{PROG}: warning: {message}", file=sys.stderr)


class _LogLine(logging.Formatter):
    """Library log records as ``pegasus-x: message`` lines (``pegasus-x: warning: ...`` from WARNING up)."""

    def format(self, record: logging.LogRecord) -> str:
        level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        return f"{PROG}: {level}{record.getMessage()}"


@contextlib.contextmanager
def _log_to_stderr() -> Iterator[None]:
    """Show the library's ``pegasus_x`` log records (INFO and up, unless a level was set) on stderr while a
    command runs; the handler goes again afterwards, so repeated ``main`` calls do not repeat lines."""
    logger = logging.getLogger("pegasus_x")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogLine())
    level = logger.level
    if level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--dtype, --quantize, --kv-dtype and --device: how a command that runs a model (summarize, serve) loads it."""
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="weights and activations (auto: bf16 on CUDA, fp32 on a CPU; `pegasus-x info` says which "
                        "and why)")
    p.add_argument("--quantize", choices=QUANTIZE_MODES, help="int8: int8 decoder and LM-head weights (CPU; "
                   "faster decoding, see the README)")
    p.add_argument("--kv-dtype", choices=KV_CHOICES, help="keep generation's cross-attention keys/values in bf16 or "
                   "int8 (CPU; every decode step reads them: faster at long inputs, see the README)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when available)")


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


# ---------------------------------------------------------------------------------------------------- summarize
@dataclass
class SummarizeOptions:
    """What `pegasus-x summarize` was asked to do (argparse holds the defaults)."""

    paths: list[str]
    input: str | None
    text_field: str
    output: str | None
    model: str | None
    dtype: str | None
    quantize: str | None
    kv_dtype: str | None
    device: str | None
    batch_size: int
    max_input_tokens: int | None
    max_input_bytes: int
    chunked: bool
    stream: bool
    newline_to_n: bool
    generation: dict[str, Any]  # only the flags given; the rest come from the checkpoint

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SummarizeOptions:
        return cls(paths=args.paths, input=args.input, text_field=args.text_field, output=args.output,
                   model=args.model, dtype=None if args.dtype == "auto" else args.dtype, quantize=args.quantize,
                   kv_dtype=args.kv_dtype, device=args.device,
                   batch_size=args.batch_size, max_input_tokens=args.max_input_tokens,
                   max_input_bytes=args.max_input_bytes, chunked=args.chunked,
                   stream=args.stream, newline_to_n=args.newline_to_n,
                   generation={k: getattr(args, k) for k in GENERATION_FLAGS if getattr(args, k) is not None})


def _register_summarize(subparsers: Any) -> None:
    from .summarize import DEFAULT_BATCH_SIZE

    p = subparsers.add_parser(
        "summarize", help="summarize text or Markdown files, stdin, or a JSONL corpus",
        description="Summarize text or Markdown files (or stdin: '-', or no PATH with piped input). One input: the "
                    "summary goes to stdout; several: each under a '==> PATH <==' header, or one JSON record per "
                    "input with --output. Under torchrun the inputs are split across the processes.")
    p.add_argument("paths", nargs="*", metavar="PATH", help="text or Markdown files; '-' reads stdin")
    p.add_argument("--input", metavar="JSONL", help="a corpus: one JSON object per line with a text field "
                   "(and an optional 'id'); instead of PATHs")
    p.add_argument("--text-field", default=TEXT_FIELD, metavar="NAME", help="field of --input holding the text "
                   "(default: %(default)s)")
    p.add_argument("--output", metavar="FILE.jsonl", help="write one JSON record per input (written when all are "
                   "done; nothing is written on failure)")
    p.add_argument("--model", metavar="DIR|HUB_ID", help="checkpoint folder or hub id (default: the bundled demo "
                   "model)")
    add_model_arguments(p)
    p.add_argument("--batch-size", type=_positive_int, default=DEFAULT_BATCH_SIZE, metavar="N",
                   help="inputs generated together (default: %(default)s)")
    p.add_argument("--max-input-tokens", type=_positive_int, metavar="N", help="read at most N tokens of each "
                   "input (default: what the model takes)")
    p.add_argument("--max-input-bytes", type=_positive_int, default=MAX_INPUT_BYTES, metavar="N",
                   help="read at most N bytes of each file or stdin, dropping the rest with a warning; also the "
                        "longest --input line (default: %(default)s, 8 MiB)")
    p.add_argument("--chunked", action="store_true", help="summarize a too-long input chunk by chunk, then the "
                   "joined chunk summaries (default: truncate it, with a warning)")
    p.add_argument("--stream", action="store_true", help="print each summary while it is generated (greedy "
                   "unless --num-beams is given)")
    p.add_argument("--newline-to-n", action="store_true", help="map newlines to the <n> piece and back, for "
                   "models fine-tuned with the original PEGASUS pipeline")
    g = p.add_argument_group("generation (default: the checkpoint's generation_config)")
    g.add_argument("--max-new-tokens", type=_positive_int, metavar="N",
                   help="summary length limit (default: the checkpoint's, as transformers reads it; "
                   "20 when it sets none)")
    g.add_argument("--min-new-tokens", type=_non_negative_int, metavar="N")
    g.add_argument("--num-beams", type=_positive_int, metavar="N")
    g.add_argument("--length-penalty", type=float, metavar="X")
    g.add_argument("--no-repeat-ngram-size", type=_non_negative_int, metavar="N")
    g.add_argument("--lookahead", dest="prompt_lookup_num_tokens", type=_non_negative_int, metavar="K",
                   help="greedy search and sampling: draft up to K tokens from the source and check them in one "
                   "decoder pass (same output, fewer passes; 0 = off; beam search ignores it)")
    p.set_defaults(func=lambda args: run_summarize(SummarizeOptions.from_args(args)))


def run_summarize(opts: SummarizeOptions) -> int:
    """`pegasus-x summarize`: read every input, split them across processes, summarize, gather, write.

    Raises:
        PegasusXError: an unreadable input, a bad model or option (every process raises the same).
    """
    # Inputs are checked before the (slow) model load.
    docs = read_documents(opts.paths, opts.input, opts.text_field, opts.max_input_bytes)
    _check_output_path(opts)
    from .devices import init_distributed, rank_and_world_size

    owns_group = init_distributed(opts.device)
    rank, world = rank_and_world_size()
    try:
        if opts.stream and world > 1:
            raise InputError("--stream cannot be used with several processes; run without torchrun")
        mine = list(range(rank, len(docs), world))
        records = _summarize_share(opts, docs, mine, opts.device, show_progress=rank == 0)
        if world > 1:
            import torch.distributed as dist

            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, records)
            records = [r for part in gathered for r in part]
    finally:
        if owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
    if rank == 0:
        records.sort(key=lambda r: r[0])
        _emit(opts, docs, [r[1] for r in records])
    return 0


def _summarize_share(opts: SummarizeOptions, docs: list[Document], mine: list[int], device: str | None,
                     show_progress: bool) -> list[tuple[int, dict[str, Any]]]:
    """(input index, output record) for this process's inputs."""
    from .summarize import Summarizer, TextStreamer

    generation = dict(opts.generation)
    if opts.stream:
        generation.setdefault("num_beams", 1)  # a stream follows one hypothesis; beams would reorder it
    summarizer = Summarizer(opts.model, dtype=opts.dtype, device=device, quantize=opts.quantize,
                            kv_dtype=opts.kv_dtype, batch_size=opts.batch_size,
                            max_input_tokens=opts.max_input_tokens, newline_to_n=opts.newline_to_n, **generation)
    texts = [docs[i].text for i in mine]
    with _progress_bar(len(texts), show_progress) as bar:
        if not texts:  # more processes than inputs
            results = []
        elif opts.stream:
            results = []
            streamer = TextStreamer(summarizer.tokenizer)
            for i in mine:
                if len(docs) > 1:
                    print(f"==> {docs[i].name} <==", flush=True)
                results += summarizer.run([docs[i].text], chunked=opts.chunked, streamer=streamer)
        else:
            results = summarizer.run(texts, chunked=opts.chunked, progress=bar.update)
    records = []
    for i, result in zip(mine, results):
        if result.dropped_tokens:
            warnings.warn(summarizer.dropped_message(docs[i].name, result, python=False))
        records.append((i, {**docs[i].key, "summary": result.text, "input_tokens": result.input_tokens,
                            "dropped_tokens": result.dropped_tokens, "seconds": round(result.seconds, 3)}))
    return records


def _emit(opts: SummarizeOptions, docs: list[Document], records: list[dict[str, Any]]) -> None:
    """Write the JSONL file (atomically), or print the summaries that were not streamed already."""
    if opts.output is not None:
        lines = "".join(json_text(r, f"the record of {r.get('path', r.get('index'))}", ensure_ascii=False) + "\n"
                        for r in records)
        atomic_write_bytes(opts.output, lines.encode("utf-8"))
        print(f"{PROG}: wrote {len(records)} summaries to {opts.output}", file=sys.stderr)
    elif not opts.stream:
        for doc, record in zip(docs, records):
            if len(docs) > 1:
                print(f"==> {doc.name} <==")
            print(record["summary"])


class _progress_bar:
    """tqdm on stderr for several inputs when stderr is a terminal; a no-op otherwise."""

    def __init__(self, total: int, enabled: bool) -> None:
        self._bar = None
        if enabled and total > 1 and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="doc", file=sys.stderr, leave=False)

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def __enter__(self) -> _progress_bar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()


def _check_output_path(opts: SummarizeOptions) -> None:
    """Where the summaries go must take them, and must not be an input: checked before the model loads."""
    if opts.output is None:
        check_stdout()
    else:
        check_output(opts.output, [*opts.paths, *([opts.input] if opts.input else [])])


# ---------------------------------------------------------------------------------------------------- info
@dataclass
class InfoOptions:
    """What `pegasus-x info` was asked to show."""

    path: str

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> InfoOptions:
        return cls(path=args.path)


def _register_info(subparsers: Any) -> None:
    p = subparsers.add_parser("info", help="show a checkpoint's config, parameter count and files",
                              description="Show a checkpoint's key config fields, its parameter count (read from "
                                          "the safetensors headers, no weights loaded) and its files.")
    p.add_argument("path", metavar="DIR|HUB_ID", help="checkpoint folder (or hub id)")
    p.set_defaults(func=lambda args: run_info(InfoOptions.from_args(args)))


def run_info(opts: InfoOptions) -> int:
    """`pegasus-x info`: print what the checkpoint really runs (the validated config, the dtype it loads in, the
    parameter count, the resolved generation defaults) and its files.

    Raises:
        CheckpointError: the folder is missing, a JSON file of it is unreadable, or a safetensors header is corrupt.
        ConfigError / GenerationError: a value in config.json or generation_config.json is invalid.
    """
    from . import native
    from .checkpoint import bytes_per_value, loaded_dtypes, read_shapes, resolve
    from .config import PegasusXConfig, estimate_memory, machine_memory
    from .devices import auto_dtype

    folder = resolve(opts.path)
    c = PegasusXConfig.from_pretrained(folder)
    shapes = read_shapes(folder)
    if shapes is None:
        params = f"{estimate_memory(c).parameters:,} (from config.json; pytorch_model.bin holds no header to count)"
        dtype = "as stored in pytorch_model.bin"
    else:
        count, dtypes = _count_parameters(shapes, c.tie_word_embeddings)
        params = f"{count:,} ({', '.join(dtypes)})"
        loads = [str(t).removeprefix("torch.") for t in loaded_dtypes(shapes)]
        dtype = f"{' / '.join(loads)} by default (stored {', '.join(dtypes)}); dtype= / --dtype changes it"
    stagger = "staggered" if c.stagger_local_blocks else "not staggered"
    memory, have = estimate_memory(c, bytes_per_value(None, shapes)), machine_memory()
    rows = [("checkpoint", str(folder)),
            ("model", f"d_model {c.d_model}, {c.encoder_layers}+{c.decoder_layers} layers, "
                      f"{_pair(c.encoder_attention_heads, c.decoder_attention_heads)} heads, "
                      f"ffn {_pair(c.encoder_ffn_dim, c.decoder_ffn_dim)}, {c.activation_function}, "
                      f"layer_norm_eps {c.layer_norm_eps:g}"),
            ("attention", f"block {c.block_size}, {c.num_global_tokens} global tokens, {stagger}"),
            ("embeddings", f"{'tied' if c.tie_word_embeddings else 'not tied'} (LM head "
                           f"{'= shared embedding' if c.tie_word_embeddings else 'separate'}), "
                           f"{'scaled by sqrt(d_model)' if c.scale_embedding else 'not scaled'}"),
            ("inputs", f"up to {c.max_position_embeddings:,} tokens, vocabulary {c.vocab_size:,}"),
            ("parameters", params),
            ("dtype", dtype),
            ("memory", f"at least {_human_size(memory.total_bytes)} as loaded (weights and the largest run-time "
                       f"tensor){f'; this machine has {_human_size(have)}' if have else ''}"
                       f"{': too little, loading is refused' if have and memory.total_bytes > have else ''}"),
            ("dtype auto", auto_dtype("cpu")[1] + " (on this CPU)"),
            ("CPU kernels", native.describe()),
            ("generation", _generation_summary(folder, c))]
    for label, value in rows:
        print(f"{label:<11} {value}")
    print("files")
    for file in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        print(f"  {file.name:<32} {_human_size(file.stat().st_size):>9}")
    return 0


def _pair(encoder: int, decoder: int) -> str:
    return str(encoder) if encoder == decoder else f"{encoder}+{decoder}"


def _generation_summary(folder: Any, config: Any) -> str:
    """The generation defaults ``generate`` resolves for this folder when a call passes no options."""
    from types import SimpleNamespace

    import torch

    from .generate import resolve_options
    from .generation_config import GENERATION_CONFIG, GenerationConfig

    stored = GenerationConfig.from_pretrained(folder)
    with warnings.catch_warnings(record=True) as caught:        # "no length set" is said below, not warned
        warnings.simplefilter("always")
        o = resolve_options(SimpleNamespace(config=config, generation_config=stored), {}, torch.device("cpu"))
    search = (f"beam search ({o.num_beams} beams)" if o.num_beams > 1 else "greedy") if not o.do_sample else (
        f"sampling (temperature {o.temperature:g}, top_k {o.top_k}, top_p {o.top_p:g})")
    penalty = f"gnmt_alpha {o.gnmt_alpha:g}" if o.gnmt_alpha is not None else f"length_penalty {o.length_penalty:g}"
    length = f"up to {o.max_length - 1:,} new tokens" + (" (none set: the default)" if caught else "")
    extras = [f"{name} {value:g}" for name, value, off in (("min new tokens", o.min_length - 1, -1),
                                                           ("no_repeat_ngram_size", o.no_repeat_ngram_size, 0),
                                                           ("repetition_penalty", o.repetition_penalty, 1.0))
              if value not in (off, 0)]
    ids = f"eos {list(o.eos)}, forced eos {list(o.forced_eos)}, start {o.start}, pad {o.pad}"
    source = GENERATION_CONFIG if (folder / GENERATION_CONFIG).is_file() else "config.json"
    return ", ".join([search, penalty, length, *extras, ids]) + f" (from {source})"


def _count_parameters(shapes: dict[str, tuple[tuple[int, ...], str]], tied: bool) -> tuple[int, list[str]]:
    """(parameter count with the tied embedding counted once, dtypes stored) from the header shapes."""
    from .checkpoint import normalise_keys

    mapping = normalise_keys(list(shapes), with_head=True)
    counted: dict[str, int] = {}
    for name, ours in mapping.items():
        if ours == "lm_head.weight" and tied:  # the head is the shared embedding
            continue
        numel = 1
        for size in shapes[name][0]:
            numel *= size
        counted[ours] = numel  # aliases of the shared embedding map to one name
    return sum(counted.values()), sorted({dtype for _, dtype in shapes.values()})


def _human_size(size: float) -> str:
    if size < 1000:
        return f"{int(size)} B"
    for unit in ("kB", "MB", "GB", "TB"):
        size /= 1000
        if size < 1000:
            break
    return f"{size:.1f} {unit}"
