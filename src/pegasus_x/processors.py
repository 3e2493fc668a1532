"""Logits processors: the reference's score rules (penalties, n-gram and word bans, length rules, sampling warpers).

A processor maps fp32 scores ``(r, V)``, given the tokens so far ``(r, cur)`` and each row's input index ``(r,)``,
to new scores; :func:`build_processors` lists them in the reference's order and :func:`process` applies them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .generate import Options

Processor = Callable[[Tensor, Tensor, Tensor], Tensor]


def build_processors(opts: Options, encoder_ids: Tensor) -> list[Processor]:
    """The reference's logits processors, in its order (penalties, bans, length rules, then sampling warpers)."""
    procs: list[Processor] = []
    eos = torch.tensor(opts.eos, dtype=torch.long, device=encoder_ids.device)
    if opts.repetition_penalty != 1.0:
        procs.append(_repetition(opts.repetition_penalty))
    if opts.no_repeat_ngram_size > 0:
        procs.append(_no_repeat_ngram(opts.no_repeat_ngram_size))
    if opts.encoder_no_repeat_ngram_size > 0:
        procs.append(_encoder_no_repeat_ngram(opts.encoder_no_repeat_ngram_size, encoder_ids))
    if opts.bad_words_ids:
        procs.append(_bad_words_ban(opts.bad_words_ids, encoder_ids.device))
    if opts.min_length > 0 and opts.eos:                # like the reference: no EOS, nothing to hold back
        procs.append(lambda s, hist, _: s.index_fill(1, eos, -math.inf) if hist.shape[1] < opts.min_length else s)
    if opts.forced_eos:
        forced = torch.tensor(opts.forced_eos, device=encoder_ids.device)
        procs.append(lambda s, hist, _: (torch.full_like(s, -math.inf).index_fill(1, forced, 0.0)
                                         if hist.shape[1] == opts.max_length - 1 else s))
    if opts.do_sample:
        n_keep = len(opts.eos) + 1 if opts.num_beams > 1 else 1   # beams must keep a non-EOS continuation
        if opts.temperature != 1.0:
            procs.append(lambda s, *_: s / opts.temperature)
        if opts.top_k != 0:
            procs.append(_top_k(max(opts.top_k, n_keep)))
        if opts.top_p < 1.0:
            procs.append(_top_p(opts.top_p, n_keep))
    return procs


def _repetition(penalty: float) -> Processor:
    def apply(s: Tensor, hist: Tensor, _: Tensor) -> Tensor:
        seen = s.gather(1, hist)    # every earlier token (start token included) is penalised once
        # A tiny penalty overflows seen / penalty to +inf, which softmax turns into NaN for sampling: clamp to
        # the largest finite value (argmax is unchanged; -inf bans stay).
        boosted = (seen / penalty).clamp(max=torch.finfo(s.dtype).max)
        return s.scatter(1, hist, torch.where(seen < 0, seen * penalty, boosted))
    return apply


def _ban(s: Tensor, tokens: Tensor, hit: Tensor) -> Tensor:
    """-inf at ``tokens[r, j]`` wherever ``hit[r, j]``; misses go to a spare column past the vocabulary."""
    V = s.shape[1]
    banned = torch.zeros(s.shape[0], V + 1, dtype=torch.bool, device=s.device)
    banned.scatter_(1, torch.where(hit, tokens, V), True)
    return s.masked_fill(banned[:, :V], -math.inf)


def _no_repeat_ngram(n: int) -> Processor:
    def apply(s: Tensor, hist: Tensor, _: Tensor) -> Tensor:
        cur = hist.shape[1]
        if cur < n:
            return s
        windows = hist.unfold(1, n, 1)                                   # (r, cur-n+1, n)
        prefix = hist[:, cur - n + 1:]                                   # the n-1 newest tokens
        return _ban(s, windows[..., -1], (windows[..., :-1] == prefix[:, None]).all(-1))
    return apply


def _encoder_no_repeat_ngram(n: int, encoder_ids: Tensor) -> Processor:
    windows = encoder_ids.unfold(1, n, 1) if encoder_ids.shape[1] >= n else None   # (B, S-n+1, n), pads included

    def apply(s: Tensor, hist: Tensor, inputs: Tensor) -> Tensor:
        cur = hist.shape[1]
        if windows is None or cur < n - 1:
            return s
        w = windows.index_select(0, inputs)
        prefix = hist[:, cur - n + 1:]
        return _ban(s, w[..., -1], (w[..., :-1] == prefix[:, None]).all(-1))
    return apply


def _bad_words_ban(words: tuple[tuple[int, ...], ...], device: torch.device) -> Processor:
    single = torch.tensor([w[0] for w in words if len(w) == 1], dtype=torch.long, device=device)
    by_prefix: dict[int, list[tuple[int, ...]]] = {}
    for w in words:
        if len(w) > 1:
            by_prefix.setdefault(len(w) - 1, []).append(w)
    groups = [(torch.tensor([w[:-1] for w in ws], device=device), torch.tensor([w[-1] for w in ws], device=device))
              for ws in by_prefix.values()]

    def apply(s: Tensor, hist: Tensor, _: Tensor) -> Tensor:
        if single.numel():
            s = s.index_fill(1, single, -math.inf)
        for prefixes, last in groups:                                    # prefixes (m, p), last (m,)
            if prefixes.shape[1] <= hist.shape[1]:
                hit = (hist[:, None, -prefixes.shape[1]:] == prefixes).all(-1)    # (r, m)
                s = _ban(s, last.expand_as(hit), hit)
        return s
    return apply


def _top_k(k: int) -> Processor:
    def apply(s: Tensor, *_: Tensor) -> Tensor:
        kth = torch.topk(s, min(k, s.shape[1])).values[:, -1:]
        return s.masked_fill(s < kth, -math.inf)
    return apply


def _top_p(p: float, n_keep: int) -> Processor:
    def apply(s: Tensor, *_: Tensor) -> Tensor:
        sorted_s, order = torch.sort(s, descending=False)
        drop = sorted_s.softmax(-1).cumsum(-1) <= 1 - p                 # the low tail holding <= 1-p of the mass
        drop[:, -n_keep:] = False
        return s.masked_fill(drop.scatter(1, order, drop), -math.inf)
    return apply


def process(procs: list[Processor], scores: Tensor, hist: Tensor, inputs: Tensor) -> Tensor:
    for proc in procs:
        scores = proc(scores, hist, inputs)
    return scores
