"""Source-grounded lookahead decoding (``prompt_lookup_num_tokens=K``): fewer decoder passes, plain decoding's output.

A summary copies much of its wording from its source. Each pass feeds the current token plus a *draft* of up to K
tokens: the last n generated tokens (n in :data:`NGRAM_SIZES`, longest first) are looked up in the source ids, then in
the generated prefix, and what followed them there is the draft. One decoder pass scores all 1+K positions (causal
masking inside the draft; on the CPU the native ``decoder_rows`` kernel reads each weight and each cross-attention
key/value once for all of them, elsewhere the torch layers run). Every logits processor runs per position, with the
draft tokens before that position in the history, exactly as plain decoding would see them; the longest prefix of the
draft that plain decoding would have produced is kept, plus the token plain decoding produces after it, and the
self-attention cache is rolled back past the rejected tokens (:meth:`~pegasus_x.cache.DecoderCache.rollback`).

- Greedy: a draft token is kept when it is the argmax of the processed scores, so the output is plain greedy's.
- Sampling: a draft token d is kept with probability p(d) under the processed distribution p (warpers included);
  otherwise the token is drawn from p with d removed and renormalised. Every emitted token is therefore a draw from p
  given the tokens before it: plain sampling's distribution (not its random stream), reproducible with a seed.
- Batches: rows accept different numbers of draft tokens; every row keeps the smallest count among the unfinished
  rows (a row whose accepted draft holds an EOS does not hold the others back). Each row's tokens up to that count
  are the ones plain decoding gives, so the output stays exact; a batch gets fewer tokens per pass than one input.
- Beam search stays on the plain path (``num_beams > 1`` ignores ``prompt_lookup_num_tokens``): verifying per-beam
  drafts exactly needs the reference's candidate bookkeeping for several steps at once, which is not implemented.

"Exact" holds up to floating-point summation order: a pass over 1+K rows sums in another order than a one-row
step (as a GPU does), so two candidates whose scores tie to the last bits could swap.
``benchmarks/lookahead.py`` measures the cost of a pass and the passes saved.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .cache import FIRST_CHUNK, DecoderCache, next_capacity
from .outputs import GenerateOutput
from .processors import Processor, process

NGRAM_SIZES = (3, 2, 1)   # lengths of the generated suffix looked up, longest (most specific) first


# ---------------------------------------------------------------------------------------------------- drafts
@dataclass
class Source:
    """One input's source ids and where each n-gram of them ends (positions just past it, ascending)."""

    ids: list[int]
    ends: dict[tuple[int, ...], list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _index(self.ids, 0, self.ends)


@dataclass
class Row:
    """One decoder row's drafting state: its input's source, its generated tokens (start token excluded) with their
    n-gram index, and where in the source its last draft came from (copying tends to continue from there)."""

    source: Source
    out: list[int] = field(default_factory=list)
    out_ends: dict[tuple[int, ...], list[int]] = field(default_factory=dict)
    pointer: int = 0

    def extend(self, tokens: list[int]) -> None:
        start = len(self.out)
        self.out.extend(tokens)
        _index(self.out, start, self.out_ends)


def _index(tokens: list[int], start: int, ends: dict[tuple[int, ...], list[int]]) -> None:
    """Add the n-grams of ``tokens`` that end at positions ``start …`` to ``ends``."""
    for p in range(start + 1, len(tokens) + 1):
        for n in NGRAM_SIZES:
            if p >= n:
                ends.setdefault(tuple(tokens[p - n:p]), []).append(p)


def draft(row: Row, k: int) -> list[int]:
    """Up to ``k`` tokens guessed to follow ``row.out``: what followed its last n tokens in the source (the first
    occurrence at or after the row's previous draft, else the first), else in the row's own earlier output (the
    latest occurrence); an empty list when nothing matches."""
    out = row.out
    for n in NGRAM_SIZES:
        if len(out) < n:
            continue
        key = tuple(out[-n:])
        ends = row.source.ends.get(key)
        if ends:
            i = bisect.bisect_left(ends, row.pointer)
            end = ends[i] if i < len(ends) else ends[0]
            guess = row.source.ids[end:end + k]
            if guess:
                row.pointer = end
                return guess
        ends = row.out_ends.get(key)
        if ends and len(ends) > 1:                       # the last occurrence is the suffix itself
            return out[ends[-2]:ends[-2] + k]
    return []


def sources(input_ids: Tensor | None, keep: Tensor, batch: int) -> list[Source]:
    """Each input's real source ids (padding dropped); empty without ``input_ids`` (drafts then come from the
    output alone)."""
    if input_ids is None:
        return [Source([]) for _ in range(batch)]
    ids = input_ids.cpu()
    if keep.shape != ids.shape:                        # encoder outputs of other ids: no mask to trust
        return [Source(row.tolist()) for row in ids]
    return [Source(row[k].tolist()) for row, k in zip(ids, keep.cpu())]


# ---------------------------------------------------------------------------------------------------- search
def _choose(scores: Tensor, guess: Tensor, valid: Tensor, do_sample: bool, generator: torch.Generator | None
            ) -> Tensor:
    """The token plain decoding emits at one position, ``(r,)``, given processed scores ``(r, V)``.

    Greedy: the argmax. Sampling, for rows with a draft token here (``valid``): ``guess`` with probability p(guess),
    else a draw from p without it; other rows: a draw from p. Either way a draw from p.
    """
    if not do_sample:
        return scores.argmax(-1)
    p = scores.softmax(-1)
    g = guess.clamp(min=0)[:, None]
    keep_guess = (torch.rand(p.shape[0], 1, generator=generator, device=p.device) < p.gather(1, g)) & valid[:, None]
    residual = torch.where(valid[:, None], p.scatter(1, g, 0.0), p)
    # p(guess) = 1 leaves nothing to draw from, but then the guess is always kept: draw from p instead.
    residual = torch.where(residual.sum(1, keepdim=True) > 0, residual, p)
    drawn = torch.multinomial(residual, 1, generator=generator)
    return torch.where(keep_guess, g, drawn).squeeze(1)


def lookahead_search(step: Callable[..., Tensor], cache: DecoderCache, opts, procs: list[Processor], batch: int,
                     inputs_source: list[Source]) -> GenerateOutput:
    """Greedy search or sampling, as :func:`pegasus_x.generate.greedy_or_sample` outputs them, verifying up to
    ``opts.lookahead`` draft tokens per decoder pass (see the module docstring).

    Args:
        step: ``make_step``'s :class:`~pegasus_x.generate.Step`; ``step(tokens, every=True)`` gives every
            position's logits.
        cache: the decoder cache (rolled back past rejected draft tokens).
        opts: resolved :class:`~pegasus_x.generate.Options` with ``num_beams == 1``.
        procs: the logits processors.
        batch: inputs.
        inputs_source: each input's :class:`Source` (from :func:`sources`).
    """
    from .generate import _Streamer, _sync_every, _used_length, _widen   # (generate imports this module)

    group, L, dev = opts.num_return_sequences, opts.max_length, cache.cross_k[0].device
    eos = torch.tensor(opts.eos, dtype=torch.long, device=dev)
    out = torch.full((batch * group, min(L, FIRST_CHUNK)), opts.pad, dtype=torch.long, device=dev)
    inputs = torch.arange(batch, device=dev)
    rows = torch.arange(batch * group, device=dev)
    seqs = out.clone()
    seqs[:, 0] = opts.start
    done = torch.zeros(batch * group, dtype=torch.bool, device=dev)
    stream = _Streamer(opts.streamer, out.shape[0], opts.pad, seqs[:, :1])
    states = [Row(inputs_source[i]) for i in range(batch) for _ in range(group)]
    cur, every, last_check = 1, _sync_every(dev), 1
    tokens, row_inputs = seqs[:, :1], inputs.repeat_interleave(group)
    while True:
        room = min(opts.lookahead, L - 1 - cur)          # the pass then emits at most room + 1 tokens, up to L
        finished = done.tolist()
        guesses = [[] if end or room == 0 else draft(s, room) for s, end in zip(states, finished)]
        k = max(map(len, guesses))
        r = len(states)
        guess = torch.full((r, k), -1, dtype=torch.long)
        for i, g in enumerate(guesses):
            guess[i, :len(g)] = torch.tensor(g, dtype=torch.long)
        guess = guess.to(dev)
        valid = guess >= 0                                # (r, k): this row has a draft token there
        length = cache.length
        if k == 0:
            logits = step(tokens)[:, None]                # (r, 1, V): a plain step (the native kernels take it)
        else:
            logits = step(torch.cat([tokens, guess.clamp(min=0)], 1), every=True)     # (r, 1+k, V)
        if cur + k + 1 > seqs.shape[1]:
            seqs = _widen(seqs, next_capacity(cur + k + 1, seqs.shape[1], L), opts.pad)
        seqs[:, cur:cur + k] = torch.where(valid, guess, opts.pad)
        chosen = torch.empty(r, k + 1, dtype=torch.long, device=dev)
        for j in range(k + 1):
            scores = process(procs, logits[:, j], seqs[:, :cur + j], row_inputs)
            here = valid[:, j] if j < k else torch.zeros(r, dtype=torch.bool, device=dev)
            chosen[:, j] = _choose(scores, guess[:, j] if j < k else here.long(), here, opts.do_sample,
                                   opts.generator)
        kept = ((chosen[:, :k] == guess) & valid).long().cumprod(1)             # (r, k) leading accepted drafts
        run = kept.sum(1)
        ends_inside = (torch.isin(chosen[:, :k], eos) & kept.bool()).any(1)
        free = done | ends_inside                         # rows that do not limit the batch's accepted count
        n = int(torch.where(free, k, run).min()) if k else 0
        for j in range(n + 1):                            # plain decoding's bookkeeping, one position at a time
            nxt = chosen[:, j].masked_fill(done, opts.pad)
            seqs[:, cur] = nxt
            done |= torch.isin(nxt, eos)
            stream.put(rows, nxt)
            cur += 1
        seqs[:, cur:cur + k - n] = opts.pad              # rejected drafts
        cache.rollback(length + 1 + n)
        emitted = seqs[:, cur - n - 1:cur].tolist()
        for s, end, toks in zip(states, finished, emitted):
            if not end:
                s.extend(toks)
        if cur == L:
            break
        if cur - last_check >= every and bool(done.any()):
            last_check = cur
            alive = ~done.view(-1, group).all(1)
            if not bool(alive.any()):
                break
            if not bool(alive.all()):
                out = _widen(out, seqs.shape[1], opts.pad)
                out[rows] = seqs
                keep = alive.nonzero().squeeze(1)
                cache.keep_inputs(keep)
                inputs, kept_rows = inputs[keep], (keep[:, None] * group + torch.arange(group, device=dev)).flatten()
                row_inputs = inputs.repeat_interleave(group)
                rows, seqs, done = rows[kept_rows], seqs[kept_rows], done[kept_rows]
                states = [states[i] for i in kept_rows.tolist()]
        tokens = seqs[:, cur - 1:cur]
    out = _widen(out, seqs.shape[1], opts.pad)
    out[rows] = seqs
    stream.end()
    return GenerateOutput(out[:, :_used_length(out, cur, opts)])
