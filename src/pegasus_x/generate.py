"""Generation: encode once → prefill the start token → decode one token at a time.

Greedy search, sampling and beam search are small functions over a ``step(tokens) -> logits`` closure around a
:class:`~pegasus_x.cache.DecoderCache`: the encoder runs once, the cross-attention keys/values are computed once per
*input* and shared by all its beams, and only the self-attention cache is reordered (in place) when beams are
reselected. The cache and the token buffers grow with the output, so ``max_new_tokens`` is only a limit. Inputs
whose hypotheses are all final leave the batch, so finished work stops costing compute.

The outputs are token-identical to transformers' ``generate`` (5.x): same logits processors in the same order, same
beam bookkeeping (2×beams candidates per step, alive/finished sets, ``early_stopping`` True/False/"never",
score = sum_logprobs / generated_len ** length_penalty), same stopping rules. One deliberate difference: positions
after a beam hypothesis' end hold ``pad_token_id`` (the reference pads beam outputs with EOS when pad is 0).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native
from .cache import FIRST_CHUNK, DecoderCache, new_cache, next_capacity
from .errors import GenerationError, InputError
from .generation_config import (DEFAULT_MAX_NEW_TOKENS, DEFAULTS, RUNTIME_OPTIONS, GenerationConfig,
                                as_generation_config, merge)
from .lookahead import lookahead_search, sources
from .outputs import GenerateOutput, encoder_inputs
from .processors import Processor, build_processors, process

NEG = -1.0e9                 # the "impossible" score of the reference's beam bookkeeping
MIN_TEMPERATURE = 1e-4
SEED_MAX = 2 ** 64 - 1       # torch.Generator.manual_seed's largest seed
SYNC_EVERY = 8               # decode steps between checks for finished inputs on an accelerator
MAX_LOOKAHEAD = 64           # draft tokens per pass: past this a pass costs more than the tokens it can save

# Every keyword generate() takes besides the inputs: the config options and the per-call ones.
OPTION_NAMES = frozenset(DEFAULTS) | frozenset(RUNTIME_OPTIONS)


@dataclass(frozen=True)
class Options:
    """Resolved options. Lengths count the decoder start token, like the reference's ``max_length``."""

    max_length: int
    min_length: int
    num_beams: int
    length_penalty: float
    gnmt_alpha: float | None
    early_stopping: bool | str
    num_return_sequences: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    generator: torch.Generator | None
    no_repeat_ngram_size: int
    encoder_no_repeat_ngram_size: int
    repetition_penalty: float
    bad_words_ids: tuple[tuple[int, ...], ...]
    forced_eos: tuple[int, ...]
    eos: tuple[int, ...]
    pad: int
    start: int
    return_dict: bool
    streamer: Any
    lookahead: int = 0    # prompt_lookup_num_tokens: draft tokens verified per decoder pass (0 = off)

    def penalty(self, length: int) -> float:
        """Length normaliser: ``((5 + len) / 6) ** gnmt_alpha`` (GNMT) if given, else ``len ** length_penalty``."""
        if self.gnmt_alpha is not None:
            return ((5 + length) / 6) ** self.gnmt_alpha
        return length ** self.length_penalty


# ---------------------------------------------------------------------------------------------------- options
def resolve_options(model, options: dict[str, Any], device: torch.device,
                    generation_config: Any = None) -> Options:
    """Resolve one call's options the way transformers 5 does (see :mod:`pegasus_x.generation_config`) and
    validate them.

    Args:
        model: gives ``generation_config`` (the checkpoint's defaults) and ``config`` (vocabulary size, positions).
        options: the caller's keyword arguments.
        device: where a ``seed`` generator lives.
        generation_config: a :class:`GenerationConfig` (or dict) over the model's, under ``options``.
    Raises:
        GenerationError: an unknown option name or a value out of range.
    """
    unknown = sorted(set(options) - OPTION_NAMES)
    if unknown:
        raise GenerationError(f"unknown generation option(s) {unknown}; known options: "
                              f"{', '.join(sorted(OPTION_NAMES))}")
    given = None if generation_config is None else as_generation_config(generation_config)
    value, no_max_length = merge(as_generation_config(getattr(model, "generation_config", None)), given, options)
    value.update({k: options.get(k, v) for k, v in RUNTIME_OPTIONS.items()})
    cfg = model.config
    vocab = cfg.vocab_size
    max_length = _resolve_max_length(value, no_max_length, cfg.max_position_embeddings)
    min_length = _resolve_min_length(value)
    beams = _int("num_beams", value["num_beams"], 1)
    nrs = _int("num_return_sequences", value["num_return_sequences"], 1)
    do_sample = _bool("do_sample", value["do_sample"])
    if beams == 1 and not do_sample and nrs > 1:
        raise GenerationError(f"num_return_sequences={nrs} needs beam search (num_beams >= {nrs}) or do_sample=True; "
                              "greedy search returns one sequence per input")
    if beams > 1 and nrs > beams:
        raise GenerationError(f"num_return_sequences={nrs} is larger than num_beams={beams}; beam search can only "
                              f"return up to num_beams hypotheses per input")
    if value["early_stopping"] not in (True, False, "never"):
        raise GenerationError(f"early_stopping must be True, False or 'never', got {value['early_stopping']!r}")
    top_p = _float("top_p", value["top_p"])
    if not 0.0 < top_p <= 1.0:
        raise GenerationError(f"top_p must be in (0, 1], got {top_p}; use 1.0 to disable nucleus sampling")
    temperature = _float("temperature", value["temperature"])
    if not temperature >= MIN_TEMPERATURE:
        # Below this, logits / temperature overflow to inf and sampling turns into NaN; it is argmax anyway.
        raise GenerationError(f"temperature must be >= {MIN_TEMPERATURE}, got {temperature}; for deterministic "
                              "output use do_sample=False")
    repetition = _float("repetition_penalty", value["repetition_penalty"])
    if repetition < torch.finfo(torch.float32).tiny:       # smaller rounds to 0 in fp32: 0/0 = NaN scores
        raise GenerationError(f"repetition_penalty must be > 0 (1.0 = off) and at least "
                              f"{torch.finfo(torch.float32).tiny:.3g} (fp32's smallest normal), got {repetition}")
    gnmt = None if value["gnmt_alpha"] is None else _float("gnmt_alpha", value["gnmt_alpha"])
    eos, pad, start = _special_tokens(value, vocab)
    forced = () if value["forced_eos_token_id"] is None else _token_ids("forced_eos_token_id",
                                                                         value["forced_eos_token_id"], vocab)
    streamer = value["streamer"]
    if streamer is not None:
        if beams > 1:
            raise GenerationError("a streamer cannot follow beam search (hypotheses change until the end); "
                                  "use num_beams=1 or drop the streamer")
        if not (callable(streamer) or hasattr(streamer, "put")):
            raise GenerationError("streamer must have put(tokens)/end() methods or be a callable(tokens)")
    if beams > 1 and vocab < max(2, 1 + len(eos)) * beams:
        raise GenerationError(f"num_beams={beams} needs a vocabulary of at least {max(2, 1 + len(eos)) * beams} "
                              f"tokens, the model has {vocab}")
    return Options(
        max_length=max_length, min_length=min_length, num_beams=beams,
        length_penalty=_float("length_penalty", value["length_penalty"]), gnmt_alpha=gnmt,
        early_stopping=value["early_stopping"], num_return_sequences=nrs, do_sample=do_sample,
        temperature=temperature, top_k=_int("top_k", value["top_k"], 0), top_p=top_p,
        generator=_generator(value["generator"], value["seed"], device),
        no_repeat_ngram_size=_int("no_repeat_ngram_size", value["no_repeat_ngram_size"], 0),
        encoder_no_repeat_ngram_size=_int("encoder_no_repeat_ngram_size", value["encoder_no_repeat_ngram_size"], 0),
        repetition_penalty=repetition, bad_words_ids=_bad_words(value["bad_words_ids"], eos, vocab),
        forced_eos=forced, eos=eos, pad=pad, start=start,
        return_dict=_bool("return_dict_in_generate", value["return_dict_in_generate"])
        or _bool("output_scores", value["output_scores"]),
        streamer=streamer, lookahead=_lookahead(value["prompt_lookup_num_tokens"]))


def _resolve_max_length(value: dict[str, Any], no_max_length: bool, max_positions: int) -> int:
    """Total length (start token included): ``max_new_tokens`` + 1 when any layer sets it, else ``max_length``,
    else transformers' default of 20 new tokens (at most ``max_position_embeddings`` in all)."""
    if value["max_length"] is not None:                  # checked even where max_new_tokens wins
        _int("max_length", value["max_length"], 2)
    if value["max_new_tokens"] is not None:
        return _int("max_new_tokens", value["max_new_tokens"], 1) + 1
    if not no_max_length:
        return value["max_length"]
    warnings.warn(f"no max_new_tokens given and the checkpoint sets no length: generating at most "
                  f"{DEFAULT_MAX_NEW_TOKENS} new tokens, as transformers does; pass max_new_tokens to choose",
                  stacklevel=5)
    return max(2, min(DEFAULT_MAX_NEW_TOKENS + 1, max_positions))


def _resolve_min_length(value: dict[str, Any]) -> int:
    """Total minimum length (start token included): ``min_new_tokens`` + 1 when any layer sets it, else
    ``min_length``."""
    min_length = _int("min_length", value["min_length"], 0)
    if value["min_new_tokens"] is not None:
        return _int("min_new_tokens", value["min_new_tokens"], 0) + 1
    return min_length


def _special_tokens(value: dict[str, Any], vocab: int) -> tuple[tuple[int, ...], int, int]:
    """(eos ids, pad id, start id) with transformers' fallbacks: no EOS → nothing ends early; no pad → the first
    EOS; no decoder start → ``bos_token_id``."""
    eos = () if value["eos_token_id"] is None else _token_ids("eos_token_id", value["eos_token_id"], vocab)
    pad = value["pad_token_id"]
    if pad is None:
        pad = eos[0] if eos else 0         # without EOS no row ends early, so no position is ever padded
    start = value["decoder_start_token_id"]
    if start is None:
        start = value["bos_token_id"]
    if start is None:
        raise GenerationError("no decoder_start_token_id (or bos_token_id) in the generation config; pass "
                              "decoder_start_token_id=0 for PEGASUS-X or add it to generation_config.json")
    return (eos, _token_ids("pad_token_id", pad, vocab)[0],
            _token_ids("decoder_start_token_id", start, vocab)[0])


def _int(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise GenerationError(f"{name} must be an integer >= {low}, got {value!r}")
    if high is not None and value > high:
        raise GenerationError(f"{name} must be an integer <= {high}, got {value!r}")
    return value


def _float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise GenerationError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise GenerationError(f"{name} must be True or False, got {value!r}")
    return value


def _token_ids(name: str, value: Any, vocab: int) -> tuple[int, ...]:
    ids = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if not ids or any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in ids):
        raise GenerationError(f"{name} must be a token id (or list of ids) in [0, {vocab}), got {value!r}")
    return ids


def _bad_words(value: Any, eos: tuple[int, ...], vocab: int) -> tuple[tuple[int, ...], ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(w, (list, tuple)) and w for w in value):
        raise GenerationError(f"bad_words_ids must be a non-empty list of non-empty lists of token ids, got {value!r}")
    words = tuple(_token_ids("bad_words_ids entry", list(w), vocab) for w in value)
    # Like the reference: a lone EOS is never banned (generation could not end).
    return tuple(w for w in words if not (len(w) == 1 and w[0] in eos))


def _lookahead(value: Any) -> int:
    if value is None:
        return 0
    return _int("prompt_lookup_num_tokens", value, 0, MAX_LOOKAHEAD)


def _generator(generator: Any, seed: Any, device: torch.device) -> torch.Generator | None:
    if generator is not None and seed is not None:
        raise GenerationError("give either generator or seed, not both")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise GenerationError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        return generator
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(_int("seed", seed, 0, SEED_MAX))


# ---------------------------------------------------------------------------------------------------- decoding
class Step:
    """``step(tokens (R, T)) -> fp32 logits (R, V)`` of the last position (``step(tokens, every=True)``: of every
    position, ``(R, T, V)``); advances the cache by T and counts its calls in ``passes``.

    An object rather than a closure that counts in an attribute of itself: a function naming itself is a reference
    cycle, which would keep each call's cache (the cross-attention keys/values) until the cycle collector ran."""

    def __init__(self, model, cache: DecoderCache):
        self.decoder, self.head, self.cache, self.passes = model.get_decoder(), model.lm_head, cache, 0

    def __call__(self, tokens: Tensor, every: bool = False) -> Tensor:
        self.passes += 1
        h = self.decoder(tokens, None, None, cache=self.cache)
        return self.head(h if every else h[:, -1]).float()


def make_step(model, cache: DecoderCache) -> Step:
    """The :class:`Step` of ``model`` over ``cache``."""
    return Step(model, cache)


def _sync_every(device: torch.device) -> int:
    # Pruning finished inputs needs their state on the host. Free on CPU; on an accelerator it would stall the
    # queue every token, so check every few steps (finished rows ride along meanwhile, emitting pad).
    return 1 if device.type == "cpu" else SYNC_EVERY


def greedy_or_sample(step: Callable[[Tensor], Tensor], cache: DecoderCache, opts: Options,
                     procs: list[Processor], batch: int, fast: bool) -> GenerateOutput:
    """Greedy search (argmax) or multinomial sampling; rows of inputs that are all finished leave the batch.

    ``num_return_sequences`` rows per input (1 for greedy). Finished rows emit pad, like the reference.
    ``fast``: the argmax by the native kernel (the first index among equals, as ``argmax``); see :func:`beam_search`.
    """
    argmax = native.argmax if fast else (lambda x: x.argmax(-1))
    group, L, dev = opts.num_return_sequences, opts.max_length, cache.cross_k[0].device
    eos = torch.tensor(opts.eos, dtype=torch.long, device=dev)
    out = torch.full((batch * group, min(L, FIRST_CHUNK)), opts.pad, dtype=torch.long, device=dev)
    inputs = torch.arange(batch, device=dev)                             # active inputs
    rows = torch.arange(batch * group, device=dev)                       # their output rows, in cache order
    seqs = out.clone()
    seqs[:, 0] = opts.start
    done = torch.zeros(batch * group, dtype=torch.bool, device=dev)
    stream = _Streamer(opts.streamer, out.shape[0], opts.pad, seqs[:, :1])
    cur, every = 1, _sync_every(dev)
    tokens, row_inputs = seqs[:, :1], inputs.repeat_interleave(group)
    while True:
        scores = process(procs, step(tokens), seqs[:, :cur], row_inputs)
        if opts.do_sample:
            nxt = torch.multinomial(scores.softmax(-1), 1, generator=opts.generator).squeeze(1)
        else:
            nxt = argmax(scores)
        nxt = nxt.masked_fill(done, opts.pad)
        if cur == seqs.shape[1]:
            seqs = _widen(seqs, next_capacity(cur + 1, cur, L), opts.pad)
        seqs[:, cur] = nxt
        done |= torch.isin(nxt, eos)
        stream.put(rows, nxt)
        cur += 1
        if cur == L:
            break
        if cur % every == 0 and bool(done.any()):                        # (one check while nothing has ended)
            alive = ~done.view(-1, group).all(1)                         # inputs with an unfinished row
            if not bool(alive.any()):
                break
            if not bool(alive.all()):
                out = _widen(out, seqs.shape[1], opts.pad)
                out[rows] = seqs
                kept_inputs = alive.nonzero().squeeze(1)
                cache.keep_inputs(kept_inputs)
                kept_rows = (kept_inputs[:, None] * group + torch.arange(group, device=dev)).flatten()
                inputs = inputs[kept_inputs]
                row_inputs = inputs.repeat_interleave(group)
                rows, seqs, done, nxt = rows[kept_rows], seqs[kept_rows], done[kept_rows], nxt[kept_rows]
        tokens = nxt[:, None]
    out = _widen(out, seqs.shape[1], opts.pad)
    out[rows] = seqs
    stream.end()
    return GenerateOutput(out[:, :_used_length(out, cur, opts)])


def _widen(seqs: Tensor, width: int, pad: int) -> Tensor:
    """``seqs`` ``(..., L)`` padded on the right with ``pad`` to ``width`` positions (itself when that wide).

    Token buffers start at :data:`~pegasus_x.cache.FIRST_CHUNK` positions and grow like the cache, so a huge
    ``max_new_tokens`` costs nothing until tokens are really generated.
    """
    if seqs.shape[-1] >= width:
        return seqs
    return torch.cat([seqs, seqs.new_full((*seqs.shape[:-1], width - seqs.shape[-1]), pad)], dim=-1)


def _used_length(seqs: Tensor, cur: int, opts: Options) -> int:
    """Length the reference returns: up to the step at which the last row finished (or max_length)."""
    gen = seqs[:, 1:cur]
    hit = torch.isin(gen, torch.tensor(opts.eos, dtype=torch.long, device=gen.device))
    end = torch.where(hit.any(1), hit.int().argmax(1) + 1, cur - 1)      # generated tokens up to the first EOS
    return int(end.max()) + 1


class _Streamer:
    """Feeds new tokens ``(rows_total,)`` (pad for finished rows) to a transformers-style streamer or a callable."""

    def __init__(self, target: Any, total: int, pad: int, prompt: Tensor):
        self.target, self.total, self.pad = target, total, pad
        if target is not None and hasattr(target, "put"):
            target.put(prompt.cpu())                                     # transformers' streamers expect the prompt

    def put(self, rows: Tensor, tokens: Tensor) -> None:
        if self.target is None:
            return
        full = tokens.new_full((self.total,), self.pad).index_copy(0, rows, tokens).cpu()
        self.target.put(full) if hasattr(self.target, "put") else self.target(full)

    def end(self) -> None:
        if self.target is not None and hasattr(self.target, "end"):
            self.target.end()


@dataclass
class BeamState:
    """Per active input ``b``, ``K`` beams, ``W`` positions (≤ max_length; :meth:`widen` grows them): the alive
    (running) and finished hypotheses."""

    run_seqs: Tensor      # (b, K, W) long
    run_scores: Tensor    # (b, K) fp32 summed log-probs; beam k > 0 starts at NEG so step 1 expands beam 0 only
    fin_seqs: Tensor      # (b, K, W)
    fin_scores: Tensor    # (b, K) length-penalised; NEG where empty
    fin_done: Tensor      # (b, K) bool: slot holds a finished hypothesis
    fin_len: Tensor       # (b, K) generated tokens of each finished hypothesis
    open: Tensor          # (b, 1) bool: could a running beam still beat the worst finished one?

    def select(self, kept_inputs: Tensor) -> "BeamState":
        return BeamState(*(t.index_select(0, kept_inputs) for t in vars(self).values()))

    def widen(self, width: int, pad: int) -> None:
        """Make room for ``width`` positions in the token buffers (they grow with the output; see :func:`_widen`)."""
        self.run_seqs, self.fin_seqs = _widen(self.run_seqs, width, pad), _widen(self.fin_seqs, width, pad)


def beam_search(step: Callable[[Tensor], Tensor], cache: DecoderCache, opts: Options, procs: list[Processor],
                batch: int, fast: bool) -> GenerateOutput:
    """Beam search (or beam sampling with ``do_sample``) with the reference's alive/finished bookkeeping.

    Each step keeps ``C = max(2, 1+n_eos)·K`` candidates per input; those ending in EOS (or at max_length) among the
    best K candidates enter the finished set with score sum_logprobs / penalty(generated_len), and the best K
    unfinished candidates stay alive. An input is done when no alive beam can beat its worst finished hypothesis
    (``early_stopping`` False: judged at the current length; "never": at max_length when the penalty favours length)
    or, with ``early_stopping=True``, as soon as K hypotheses are finished. Done inputs leave the batch.

    ``fast``: the log-softmax and the candidates' top-k over the vocabulary by the native kernels (the model's
    switch, :func:`pegasus_x.native.available`); else by torch, the reference they are tested against.
    """
    log_softmax = native.log_softmax if fast else lambda x: F.log_softmax(x, dim=-1)
    topk = native.topk if fast else torch.topk
    K, L, dev = opts.num_beams, opts.max_length, cache.cross_k[0].device
    C = max(2, 1 + len(opts.eos)) * K
    eos = torch.tensor(opts.eos, dtype=torch.long, device=dev)
    seqs = torch.full((batch, K, min(L, FIRST_CHUNK)), opts.pad, dtype=torch.long, device=dev)
    seqs[:, :, 0] = opts.start
    scores = torch.zeros(batch, K, device=dev)
    scores[:, 1:] = NEG
    st = BeamState(seqs, scores, seqs.clone(), torch.full((batch, K), NEG, device=dev),
                   torch.zeros(batch, K, dtype=torch.bool, device=dev), torch.zeros(batch, K, dtype=torch.long,
                                                                                     device=dev),
                   torch.ones(batch, 1, dtype=torch.bool, device=dev))
    out = BeamState(*(t.clone() for t in vars(st).values()))            # final state of every input
    inputs = torch.arange(batch, device=dev)
    top_k_mask = torch.arange(C, device=dev) < K                          # only the best K candidates may finish
    cur, every = 1, _sync_every(dev)
    while True:
        b = inputs.shape[0]
        if cur == st.run_seqs.shape[2]:
            st.widen(next_capacity(cur + 1, cur, L), opts.pad)
        W = st.run_seqs.shape[2]
        logp = log_softmax(step(st.run_seqs[:, :, cur - 1].reshape(-1, 1)))
        logp = process(procs, logp, st.run_seqs.view(b * K, W)[:, :cur], inputs.repeat_interleave(K))
        V = logp.shape[1]
        total = (logp.view(b, K, V) + st.run_scores[:, :, None]).view(b, K * V)
        if opts.do_sample:
            cand = torch.multinomial(total.softmax(-1), C, generator=opts.generator)
            cand_scores = total.gather(1, cand)
        else:
            cand_scores, cand = topk(total, C)
        parent, token = cand // V, cand % V
        cand_seqs = st.run_seqs.gather(1, parent[:, :, None].expand(b, C, W))
        cand_seqs[:, :, cur] = token
        ended = torch.isin(token, eos) | (cur + 1 >= L)
        _update_finished(st, cand_seqs, cand_scores, ended & top_k_mask, cur, opts)
        alive = cand_scores + ended.to(torch.float32) * NEG
        pick = torch.topk(alive, K).indices
        st.run_seqs = cand_seqs.gather(1, pick[:, :, None].expand(b, K, W))
        st.run_scores = alive.gather(1, pick)
        cache.reorder((parent.gather(1, pick) + torch.arange(b, device=dev)[:, None] * K).flatten())
        cur += 1
        _update_open(st, cur, opts)
        if cur == L:
            break
        if cur % every == 0:
            done = ~st.open.squeeze(1) | (st.fin_done.all(1) & (opts.early_stopping is True))
            if bool(done.all()):
                break
            if bool(done.any()):
                _store(out, inputs, st, opts.pad)
                kept_inputs = (~done).nonzero().squeeze(1)
                cache.keep_inputs(kept_inputs)
                inputs, st = inputs[kept_inputs], st.select(kept_inputs)
    _store(out, inputs, st, opts.pad)
    n = opts.num_return_sequences
    length = int(out.fin_len[:, :n].max()) + 1
    return GenerateOutput(out.fin_seqs[:, :n, :length].reshape(batch * n, length),
                          out.fin_scores[:, :n].reshape(batch * n))


def _update_finished(st: BeamState, cand_seqs: Tensor, cand_scores: Tensor, finishing: Tensor, cur: int,
                     opts: Options) -> None:
    """Merge the candidates that just finished into the K best finished hypotheses (sorted best first)."""
    s = cand_scores / opts.penalty(cur)                                  # cur tokens generated, EOS included
    s = s + (st.fin_done.all(1, keepdim=True) & (opts.early_stopping is True)).to(torch.float32) * NEG
    s = s + (~st.open).to(torch.float32) * NEG                           # done inputs admit nothing new
    s = s + (~finishing).to(torch.float32) * NEG
    merged = torch.cat([st.fin_scores, s], 1)
    best = torch.topk(merged, st.fin_scores.shape[1]).indices
    b, _, L = cand_seqs.shape
    st.fin_seqs = torch.cat([st.fin_seqs, cand_seqs], 1).gather(1, best[:, :, None].expand(b, best.shape[1], L))
    st.fin_scores = merged.gather(1, best)
    st.fin_done = torch.cat([st.fin_done, finishing], 1).gather(1, best)
    st.fin_len = torch.cat([st.fin_len, torch.full_like(cand_scores, cur, dtype=torch.long)], 1).gather(1, best)


def _update_open(st: BeamState, cur: int, opts: Options) -> None:
    """Can the best alive beam still beat the worst finished one? (``cur`` counts the start token.)"""
    favours_length = (opts.gnmt_alpha if opts.gnmt_alpha is not None else opts.length_penalty) > 0.0
    best_len = opts.max_length - 1 if opts.early_stopping == "never" and favours_length else cur - 1
    best_possible = st.run_scores[:, :1] / opts.penalty(best_len)
    worst = torch.where(st.fin_done, st.fin_scores.min(1, keepdim=True).values, NEG)
    st.open = st.open & (best_possible > worst).any(1, keepdim=True)


def _store(out: BeamState, inputs: Tensor, st: BeamState, pad: int) -> None:
    out.widen(st.run_seqs.shape[2], pad)
    for name, value in vars(st).items():
        getattr(out, name)[inputs] = value


# ---------------------------------------------------------------------------------------------------- entry point
def generate(model, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, *,
             encoder_outputs: Any = None, generation_config: GenerationConfig | dict | None = None,
             **options: Any) -> Tensor | GenerateOutput:
    """Generate summaries.

    Args:
        model: a :class:`~pegasus_x.model.PegasusXForConditionalGeneration` (put it in ``eval()`` mode).
        input_ids: ``(B, T)`` source ids, right padded (optional with ``encoder_outputs``, unless
            ``encoder_no_repeat_ngram_size`` needs them).
        attention_mask: ``(B, T)`` 1 for real tokens, 0 for padding (None: all real, or the mask inside
            ``encoder_outputs``).
        encoder_outputs: precomputed encoder outputs, e.g. ``model.get_encoder()(input_ids=..., attention_mask=...)``
            (anything with ``last_hidden_state``): the encoder is not run again.
        generation_config: a :class:`~pegasus_x.GenerationConfig` (or dict) whose set options replace the model's
            defaults for this call.
        **options: transformers' names. Length: ``max_new_tokens`` | ``max_length`` (start token included),
            ``min_new_tokens`` | ``min_length``. Search: ``num_beams``, ``length_penalty``, ``gnmt_alpha`` (use
            ((5+len)/6)**alpha instead of len**length_penalty), ``early_stopping`` (True/False/"never"),
            ``num_return_sequences``. Sampling: ``do_sample``, ``temperature``, ``top_k`` (default 50), ``top_p``,
            ``generator`` or ``seed``. Constraints: ``no_repeat_ngram_size``, ``encoder_no_repeat_ngram_size``,
            ``repetition_penalty``, ``bad_words_ids``, ``forced_eos_token_id``, and
            ``eos_token_id``/``pad_token_id``/``decoder_start_token_id``. Output: ``return_dict_in_generate`` or
            ``output_scores`` → :class:`GenerateOutput`; ``streamer``: an object with ``put(tokens)``/``end()``
            (transformers' streamers) or a callable receiving each step's new tokens ``(B·num_return_sequences,)``.
            Speed: ``prompt_lookup_num_tokens=K`` drafts up to K tokens from the source and the output and checks
            them in one decoder pass, same output (greedy and sampling; beam search ignores it; see
            :mod:`pegasus_x.lookahead`).
            Unset options come from ``generation_config``, then ``model.generation_config``, exactly as in
            transformers 5 (see :mod:`pegasus_x.generation_config`).
    Returns:
        ``(B·num_return_sequences, L)`` LongTensor starting with the decoder start token, padded with pad; or a
        :class:`GenerateOutput` (with ``decoder_passes``) when asked for.
    Raises:
        GenerationError: unknown or out-of-range options.
        InputError: malformed ids or mask (from ``model.encode``), or neither ids nor encoder outputs.
    """
    opts = resolve_options(model, options, model.device, generation_config)
    if model.training:
        warnings.warn("generate() called in training mode: dropout is active; call model.eval() first",
                      stacklevel=2)
    if input_ids is None and encoder_outputs is None:
        raise InputError("give input_ids (or encoder_outputs) to generate from")
    if input_ids is None and opts.encoder_no_repeat_ngram_size:
        raise GenerationError("encoder_no_repeat_ngram_size needs the source ids: pass input_ids with "
                              "encoder_outputs")
    with torch.inference_mode():
        if encoder_outputs is None:
            enc = model.encode(input_ids, attention_mask, skip_padding=True)
            states, keep = enc.last_hidden_state, enc.attention_mask
            del enc
        else:
            states, keep = encoder_inputs(encoder_outputs, attention_mask)
        cache = start_cache(model, states, keep, opts)
        del states                                      # the cache holds what decoding needs of them
        result = search(model, cache, keep, input_ids, opts)
    return result if opts.return_dict else result.sequences


def rows_per_input(opts: Options) -> int:
    """Decoder rows each input takes: one per beam, or per returned sequence."""
    return opts.num_beams if opts.num_beams > 1 else opts.num_return_sequences


def start_cache(model, states: Tensor, keep: Tensor, opts: Options) -> DecoderCache:
    """The decoder cache for encoder ``states`` ``(B, S, D)`` (mask ``keep``): :func:`rows_per_input` rows each."""
    return new_cache(model, states, keep, states.shape[0] * rows_per_input(opts), opts.max_length - 1)


def search(model, cache: DecoderCache, keep: Tensor, input_ids: Tensor | None, opts: Options,
           extra: Sequence[Processor] = ()) -> GenerateOutput:
    """The decoding behind :func:`generate` from a :func:`start_cache` cache (``keep``: the encoder mask): the
    processors of ``opts`` then ``extra`` (e.g. the server's cancellation rule), and beam search, lookahead or
    greedy/sampling as ``opts`` says. Call it under ``torch.inference_mode()``."""
    batch = keep.shape[0]
    source = input_ids.long() if input_ids is not None else keep.long()   # (device and batch size only)
    procs = [*build_processors(opts, source), *extra]
    step = make_step(model, cache)
    fast = native.available(model)
    if opts.num_beams > 1:
        result = beam_search(step, cache, opts, procs, batch, fast)       # no lookahead here: see lookahead.py
    elif opts.lookahead:
        drafts_from = sources(None if input_ids is None else source, keep, batch)
        result = lookahead_search(step, cache, opts, procs, batch, drafts_from)
    else:
        result = greedy_or_sample(step, cache, opts, procs, batch, fast)
    result.decoder_passes = step.passes
    return result
