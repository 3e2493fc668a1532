"""The Python side of kernels.c: each kernel's argument checks, buffers and call (the library from loader.py).

Decoding one token reads every decoder weight, the LM head and the cross-attention keys/values for one to a few
query rows, so a step is as fast as those bytes stream from memory. torch's kernels for such products stream
below the rate of a plain ``sum``; the C kernels stream each tensor once at about that rate on the threads of
torch's own OpenMP pool. ``benchmarks/generate.py`` measures both against the bandwidth floor (results in
``benchmarks/RESULTS.md``).

Every buffer the C side writes is allocated here with an explicit dtype (never the default dtype, which a caller
may have set to bf16) and a size the library itself computes (``px_*_work``) or the output's shape.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from . import abi, loader
from .abi import HEAD_DIM_MULTIPLE, MAX_DRAFT_ROWS, MAX_HEAD_DIM, MAX_ROWS, MAX_TOPK

_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _floats(count: int) -> Tensor:
    """fp32 scratch of ``count`` elements, whatever torch's default dtype."""
    return torch.empty(count, dtype=torch.float32)


def on_cpu(*tensors: Tensor | None) -> bool:
    """Whether every given tensor is on the CPU (the kernels read raw pointers: anything else would crash)."""
    return all(t is None or t.device.type == "cpu" for t in tensors)


def linear_fits(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether :func:`linear` takes these tensors: CPU (weight and bias too), fp32 or bf16, one dtype, a contiguous
    weight, 1 to ``MAX_ROWS`` rows."""
    in_features = weight.shape[1]
    rows = x.numel() // in_features if in_features else 0
    return (0 < rows <= MAX_ROWS and x.shape[-1] == in_features and on_cpu(x, weight, bias)
            and x.dtype == weight.dtype and x.dtype in _KERNEL_DTYPES and weight.is_contiguous()
            and (bias is None or bias.shape == (weight.shape[0],)))


def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear`` for tensors :func:`linear_fits` or :func:`many_rows_fit` takes, ``x`` ``(..., in)``.

    Up to ``MAX_ROWS`` rows run ``px_linear``, more ``px_linear_rows``; either streams the weight once for all rows
    where its register tiles win (kernels.c: ``tiles_win``), else once per 4 rows. Accumulates in fp32; a bf16
    result is rounded once at the end (as torch's bf16 linear does).
    """
    lib = loader.library()
    out_features, in_features = weight.shape
    rows = x.numel() // in_features
    bf16 = weight.dtype == torch.bfloat16
    xf = x.reshape(rows, in_features).to(torch.float32).contiguous()
    bf = None if bias is None else bias.to(weight.dtype).contiguous()
    y = torch.empty(rows, out_features, dtype=torch.float32)
    work = _floats(lib.px_linear_work(rows, in_features, int(bf16)))
    if (lib.px_linear if rows <= MAX_ROWS else lib.px_linear_rows)(
            weight.data_ptr(), int(bf16), out_features, in_features, xf.data_ptr(), rows,
            None if bf is None else bf.data_ptr(), y.data_ptr(), work.data_ptr(), torch.get_num_threads()):
        raise RuntimeError("px_linear refused its arguments; linear_fits should have caught this")
    return y.to(x.dtype).view(*x.shape[:-1], out_features)


def many_rows_fit(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether :func:`linear` takes these tensors past ``MAX_ROWS`` rows: what :func:`linear_fits` takes, with
    ``MAX_ROWS`` to ``MAX_DRAFT_ROWS`` rows (lookahead's passes: one stream of the weight for all rows beats
    torch's GEMM there, in fp32 too, see ``benchmarks/lookahead.py``)."""
    in_features = weight.shape[1]
    rows = x.numel() // in_features if in_features else 0
    return (MAX_ROWS < rows <= MAX_DRAFT_ROWS and x.shape[-1] == in_features and on_cpu(x, weight, bias)
            and x.dtype == weight.dtype and x.dtype in _KERNEL_DTYPES and weight.is_contiguous()
            and (bias is None or bias.shape == (weight.shape[0],)))


def gemm_preferred() -> bool:
    """Whether ``px_gemm`` beats torch's GEMM on this CPU (the library's build target: AVX2 + FMA, no AVX-512)."""
    lib = loader.library()
    return lib is not None and bool(lib.px_gemm_preferred())


def describe() -> str:
    """Which CPU kernels this process runs, for ``pegasus-x info`` (loading, or building, the library)."""
    if not loader.enabled():
        return f"torch's (the fast paths are switched off: {loader.SWITCH}=0)"
    if loader.library() is None:
        return "torch's (the native kernels are not built here: no C compiler, Windows, or a failed build)"
    encoder = ("the encoder's fp32 GEMM and attention" if gemm_preferred() else
               "the encoder on torch's GEMM (the native one is tiled for AVX2 + FMA without AVX-512)")
    return f"native: decode steps, {encoder}"


def gemm_fits(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether :func:`gemm` takes these tensors: CPU, fp32 (weight and bias too), a contiguous weight, more than
    ``MAX_DRAFT_ROWS`` rows (below, the products are bound by memory and the row kernels above stream better)."""
    in_features = weight.shape[1]
    rows = x.numel() // in_features if in_features else 0
    return (rows > MAX_DRAFT_ROWS and x.shape[-1] == in_features and on_cpu(x, weight, bias)
            and x.dtype == weight.dtype == torch.float32 and weight.is_contiguous()
            and (bias is None or (bias.shape == (weight.shape[0],) and bias.dtype == torch.float32)))


def gemm(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x, weight, bias)`` for tensors :func:`gemm_fits` takes, ``x`` ``(..., in)``: ``px_gemm``, register
    tiles of rows × outputs over weights packed as it goes, on torch's threads."""
    lib = loader.library()
    out_features, in_features = weight.shape
    rows = x.numel() // in_features
    xf = x.reshape(rows, in_features).contiguous()
    bf = None if bias is None else bias.contiguous()
    y = torch.empty(rows, out_features, dtype=torch.float32)
    threads = torch.get_num_threads()
    work = _floats(lib.px_gemm_work(rows, in_features, out_features, threads))
    if lib.px_gemm(xf.data_ptr(), rows, in_features, weight.data_ptr(), out_features,
                   None if bf is None else bf.data_ptr(), y.data_ptr(), work.data_ptr(), threads):
        raise RuntimeError("px_gemm refused its arguments; gemm_fits should have caught this")
    return y.view(*x.shape[:-1], out_features)


def encoder_attention_fits(q: Tensor, k: Tensor, v: Tensor, heads: int) -> bool:
    """Whether :func:`encoder_attention` takes these rows: CPU, fp32, contiguous ``(rows, D)`` q/k/v of one shape,
    ``D / heads`` at most ``MAX_HEAD_DIM``, and where ``px_gemm`` is preferred (the same tiles)."""
    return (q.dim() == 2 and k.shape == v.shape == q.shape and q.shape[1] % heads == 0
            and 0 < q.shape[1] // heads <= MAX_HEAD_DIM and on_cpu(q, k, v)
            and all(t.dtype == torch.float32 and t.is_contiguous() for t in (q, k, v)) and gemm_preferred())


def encoder_attention(q: Tensor, k: Tensor, v: Tensor, heads: int, num_globals: int, globals_at: Tensor,
                      queries: Tensor, keys: Tensor, keep: Tensor, out_rows: Tensor, count: int) -> Tensor:
    """The encoder's attention, task by task, for rows :func:`encoder_attention_fits` takes (row indices must be in
    range: the C side does not check them).

    Task m's queries (the rows ``queries[m]``, ``(M, Lq)`` int64) attend to the ``num_globals`` rows from
    ``globals_at[m]`` then to the rows ``keys[m]`` (``(M, Lk)``) where ``keep[m]`` (bool); query i's output is row
    ``out_rows[m, i]`` of the ``(count, D)`` result (-1: none; rows no query names are left as allocated). A block of
    tokens is a task whose queries are its keys; an input's globals, one whose keys are all its tokens.
    """
    lib = loader.library()
    (M, Lq), Lk = queries.shape, keys.shape[1]
    D = q.shape[1]
    hd = D // heads
    index = [t.to(torch.int64).contiguous() for t in (globals_at, queries, keys, out_rows)]
    flags = keep.to(torch.uint8).contiguous()
    out = torch.empty(count, D, dtype=torch.float32)
    threads = torch.get_num_threads()
    work = _floats(lib.px_encoder_attention_work(num_globals, Lq, Lk, hd, threads))
    if lib.px_encoder_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), heads, hd, M, num_globals, Lq, Lk,
                                *(t.data_ptr() for t in index[:3]), flags.data_ptr(), index[3].data_ptr(),
                                out.data_ptr(), work.data_ptr(), threads):
        raise RuntimeError("px_encoder_attention refused its arguments; encoder_attention_fits should have caught this")
    return out


def linear_int8_fits(x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None) -> bool:
    """Whether :func:`linear_int8` takes these tensors: CPU, int8 contiguous ``(out, in)`` weight, fp32 ``(out,)``
    scales, fp32 or bf16 ``x`` (and bias), 1 to ``MAX_DRAFT_ROWS`` rows."""
    out_features, in_features = qweight.shape
    rows = x.numel() // in_features if in_features else 0
    return (0 < rows <= MAX_DRAFT_ROWS and x.shape[-1] == in_features and on_cpu(x, qweight, scale, bias)
            and x.dtype in _KERNEL_DTYPES and qweight.dtype == torch.int8 and qweight.is_contiguous()
            and scale.dtype == torch.float32 and scale.shape == (out_features,) and scale.is_contiguous()
            and (bias is None or (bias.shape == (out_features,) and bias.dtype in _KERNEL_DTYPES)))


def linear_int8(x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x, qweight · scale[:, None], bias)`` for tensors :func:`linear_int8_fits` takes, ``x`` ``(..., in)``.

    The int8 weights are widened in registers and each output scaled once; fp32 accumulation, the result rounded
    once to ``x``'s dtype.
    """
    lib = loader.library()
    out_features, in_features = qweight.shape
    rows = x.numel() // in_features
    xf = x.reshape(rows, in_features).to(torch.float32).contiguous()
    bf = None if bias is None else bias.contiguous()
    y = torch.empty(rows, out_features, dtype=torch.float32)
    if lib.px_linear_int8(qweight.data_ptr(), scale.data_ptr(), out_features, in_features, xf.data_ptr(), rows,
                          None if bf is None else bf.data_ptr(), int(bf is not None and bf.dtype == torch.bfloat16),
                          y.data_ptr(), torch.get_num_threads()):
        raise RuntimeError("px_linear_int8 refused its arguments; linear_int8_fits should have caught this")
    return y.to(x.dtype).view(*x.shape[:-1], out_features)


# kernels.c's key/value formats by dtype.
_KV = {torch.float32: abi.KV["f32"], torch.bfloat16: abi.KV["bf16"], torch.int8: abi.KV["int8"]}


def attention(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, k_scale: Tensor | None = None,
              v_scale: Tensor | None = None) -> Tensor:
    """softmax(q kᵀ / sqrt(d) + mask) v for few query rows: q ``(B, H, G, d)``, k/v ``(B, H, S, d)``.

    k and v may be views of a preallocated cache (rows of d contiguous, any batch/head strides); int8 k/v come
    with fp32 row scales ``(B, H, S)`` (``k[b, h, s] · k_scale[b, h, s]`` is the key). ``keep``: bool
    ``(B, 1, 1, S)`` or None. Returns ``(B, H, G, d)`` in q's dtype. Only for what :func:`attention_fits` takes.
    """
    lib = loader.library()
    B, H, G, D = q.shape
    S = k.shape[2]
    qf = q.to(torch.float32).contiguous()
    out = torch.empty(B, H, G, D, dtype=torch.float32)
    threads = torch.get_num_threads()
    work = _floats(lib.px_attention_work(G, S, D, threads))
    keep_bytes = None if keep is None else keep.reshape(keep.shape[0], S).contiguous().view(torch.uint8)
    lib.px_attention(qf.data_ptr(), k.data_ptr(), v.data_ptr(), _KV[k.dtype],
                     None if k_scale is None else k_scale.data_ptr(), None if v_scale is None else v_scale.data_ptr(),
                     B, H, G, S, D, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                     None if keep_bytes is None else keep_bytes.data_ptr(),
                     0 if keep_bytes is None else keep_bytes.stride(0), out.data_ptr(),
                     work.data_ptr(), threads)
    return out.to(q.dtype)


def attention_fits(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, k_scale: Tensor | None = None,
                   v_scale: Tensor | None = None) -> bool:
    """Whether :func:`attention` takes these tensors (else the caller uses SDPA)."""
    B, H, G, D = q.shape
    return (D % HEAD_DIM_MULTIPLE == 0 and D <= MAX_HEAD_DIM and on_cpu(q, k, v, keep) and k.dtype == v.dtype
            and k.dtype in _KV and k.shape == v.shape == (B, H, k.shape[2], D)
            and k.stride(3) == v.stride(3) == 1 and k.stride(2) == v.stride(2) == D
            and (keep is None or (keep.dtype == torch.bool and keep.shape == (B, 1, 1, k.shape[2])))
            and (k_scale is None) == (v_scale is None) == (k.dtype != torch.int8)
            and (k_scale is None or (row_scales_fit(k, k_scale) and row_scales_fit(v, v_scale))))


def row_scales_fit(t: Tensor, scale: Tensor) -> bool:
    """Whether ``scale`` holds the fp32 row scales of int8 keys or values ``t`` ``(B, H, S, d)`` as the kernels
    read them: ``(B, H, S)`` on the CPU, laid out like ``t``'s rows (element (b, h, s) at
    (b·t_sb + h·t_sh) / d + s)."""
    D = t.shape[3]
    return (scale.dtype == torch.float32 and scale.device.type == "cpu" and scale.shape == t.shape[:3]
            and t.stride(0) % D == 0 and t.stride(1) % D == 0
            and scale.stride() == (t.stride(0) // D, t.stride(1) // D, 1))


def _weight(linear) -> tuple[Tensor, Tensor | None]:
    """A product's weight and, for an int8 one (``quantize.Int8Linear``: ``qweight`` and ``scale``), its scales."""
    qweight = getattr(linear, "qweight", None)
    return (linear.weight, None) if qweight is None else (qweight, linear.scale)


def _layer_tensors(layer) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A decoder layer's tensors by ``px_layer`` field, and the int8 weights' scales by their ``px_layer`` field."""
    sa, ca = layer.self_attn, layer.encoder_attn
    ln1, ln2, ln3 = layer.self_attn_layer_norm, layer.encoder_attn_layer_norm, layer.final_layer_norm
    own = dict(ln1_w=ln1.weight, ln1_b=ln1.bias, ln2_w=ln2.weight, ln2_b=ln2.bias, ln3_w=ln3.weight,
               ln3_b=ln3.bias, fc1_b=layer.fc1.bias, fc2_b=layer.fc2.bias)
    scales = {}
    for field, linear in dict(q=sa.q_proj, k=sa.k_proj, v=sa.v_proj, o=sa.out_proj, cq=ca.q_proj, co=ca.out_proj,
                              fc1_w=layer.fc1, fc2_w=layer.fc2).items():
        own[field], scale = _weight(linear)
        if scale is not None:
            scales[abi.SCALES[field]] = scale
    return own, scales


@dataclass
class DecoderPlan:
    """``px_decoder_rows``' arguments for one decoder over one cache (all but the position and T)."""

    layers: ctypes.Array           # of abi.Layer, one per decoder layer
    tensors: list[Tensor]          # what the pointers point into, kept alive with the plan
    rows: int
    d_model: int
    ffn: int
    inputs: int
    keys: int


@functools.lru_cache(maxsize=None)
def _layers(count: int) -> type:
    """The ctypes array type of ``count`` layers, made once: each new one is a class, whose reference cycles would
    wait for the cycle collector after every generate() call."""
    return abi.Layer * count


def decoder_plan(decoder, cache, x: Tensor) -> DecoderPlan | None:
    """The plan for :func:`decoder_step` on ``x`` ``(R, 1, D)`` (R up to ``MAX_DRAFT_ROWS``) with this cache, and
    for :func:`decoder_rows`, or None where they cannot run.

    Built once per cache: the pointers stay valid while the weights and the cache's buffers do (a cache that
    replaces its buffers drops its plan).
    """
    cfg = decoder.config
    attn = decoder.layers[0].self_attn
    dtype, rows = cache.self_k[0].dtype, x.shape[0]
    B, H, S, hd = cache.cross_k[0].shape
    if (cfg.activation_function not in abi.ACTIVATIONS or rows > MAX_DRAFT_ROWS or rows != cache.self_k[0].shape[0]
            or rows % B or attn.backend != "sdpa" or x.dtype != dtype or x.device.type != "cpu"
            or hd % HEAD_DIM_MULTIPLE or hd > MAX_HEAD_DIM or dtype not in _KERNEL_DTYPES):
        return None
    keep = cache.encoder_keep
    if keep is not None:
        if (keep.shape != (B, 1, 1, S) or keep.dtype != torch.bool or not keep.is_contiguous()
                or keep.device.type != "cpu"):
            return None
        keep = keep.view(torch.uint8)
    specs, tensors = [], [] if keep is None else [keep]
    for i, layer in enumerate(decoder.layers):
        if layer.self_attn.q_proj.bias is not None or layer.encoder_attn.q_proj.bias is not None:
            return None
        own, scales = _layer_tensors(layer)
        own.update(self_k=cache.self_k[i], self_v=cache.self_v[i], cross_k=cache.cross_k[i], cross_v=cache.cross_v[i])
        int8 = {field for field, name in abi.SCALES.items() if name in scales}
        # The cross keys/values may be narrower than the layers (quantize.py's kv_dtype): bf16, or int8 with row
        # scales.
        cross = cache.cross_k[i].dtype
        wanted = {**dict.fromkeys(int8, torch.int8), "cross_k": cross, "cross_v": cross}
        if cross not in _KV or any(
                t is None or t.dtype != wanted.get(name, dtype) or t.device.type != "cpu" or not t.is_contiguous()
                for name, t in own.items()):
            return None
        if cross == torch.int8:
            scales.update(cross_ks=cache.cross_k_scale[i], cross_vs=cache.cross_v_scale[i])
        if any(s.dtype != torch.float32 or s.device.type != "cpu" or not s.is_contiguous() for s in scales.values()):
            return None
        tensors += [*own.values(), *scales.values()]
        specs.append(abi.Layer(**{name: t.data_ptr() for name, t in {**own, **scales}.items()},
                               keep=None if keep is None else keep.data_ptr(), R=rows, B=B, H=H, hd=hd,
                               ffn=cfg.decoder_ffn_dim, max_len=cache.max_len, S=S, bf16=int(dtype == torch.bfloat16),
                               activation=abi.ACTIVATIONS[cfg.activation_function], eps=cfg.layer_norm_eps,
                               cross_kv=_KV[cross]))
    return DecoderPlan(_layers(len(specs))(*specs), tensors, rows, H * hd, cfg.decoder_ffn_dim, B, S)


def decoder_step(plan: DecoderPlan, x: Tensor, cache) -> Tensor:
    """Run every decoder layer on ``x`` ``(R, 1, D)`` for position ``cache.length``: :func:`decoder_rows` for one
    position.

    Writes this position's self-attention keys/values into ``cache`` (the caller advances ``cache.length``).
    Activations stay fp32 between the layers' operations; the result is returned in ``x``'s dtype.
    """
    return decoder_rows(plan, x, cache)


def decoder_rows_fit(plan: DecoderPlan, x: Tensor) -> bool:
    """Whether :func:`decoder_rows` takes ``x`` ``(R, T, D)`` with this plan."""
    return x.shape[0] == plan.rows and x.shape[0] * x.shape[1] <= MAX_DRAFT_ROWS


def decoder_rows(plan: DecoderPlan, x: Tensor, cache) -> Tensor:
    """Every decoder layer on ``x`` ``(R, T, D)``: T new positions ``cache.length …`` per cache row, causal among
    them (lookahead's verification pass; :func:`decoder_step` is the case T = 1).

    Writes their self-attention keys/values into ``cache`` (the caller advances ``cache.length``). Each weight and
    each cross-attention key/value is read once for all R·T rows.
    """
    lib = loader.library()
    threads = torch.get_num_threads()
    R, T, _ = x.shape
    state = x.reshape(R * T, plan.d_model).to(torch.float32, copy=True)
    work = _floats(lib.px_decoder_rows_work(R, T, plan.d_model, plan.ffn, plan.inputs, plan.keys, cache.length,
                                            threads))
    if lib.px_decoder_rows(plan.layers, len(plan.layers), cache.length, T, state.data_ptr(), work.data_ptr(),
                           threads):
        raise RuntimeError("px_decoder_rows refused its arguments; decoder_rows_fit should have caught this")
    return state.to(x.dtype).view(x.shape)


def _rows_fit(x: Tensor) -> bool:
    """Whether the beam-search kernels take ``x``: a contiguous fp32 CPU matrix."""
    return x.dim() == 2 and x.dtype == torch.float32 and x.device.type == "cpu" and x.is_contiguous()


def log_softmax(x: Tensor) -> Tensor:
    """``F.log_softmax(x, dim=-1)`` of logits ``x`` ``(rows, V)``: by ``px_log_softmax`` for the fp32 CPU matrices it
    takes, else (another dtype or device, a value that is not finite, no library) by torch."""
    lib = loader.library()
    if lib is not None and _rows_fit(x) and x.numel():
        y = torch.empty_like(x)
        if not lib.px_log_softmax(x.data_ptr(), y.data_ptr(), x.shape[0], x.shape[1], torch.get_num_threads()):
            return y
    return torch.log_softmax(x, dim=-1)


def _native_topk(x: Tensor, k: int) -> tuple[Tensor, Tensor] | None:
    """``px_topk``'s ``k`` largest of each row of ``x`` (best first, ties lowest index first), or None where it does
    not run (not an fp32 CPU matrix, ``k`` out of its range, a NaN, no library)."""
    lib = loader.library()
    rows, n = x.shape if x.dim() == 2 else (0, 0)
    if lib is None or not _rows_fit(x) or not rows or not 0 < k <= min(n, MAX_TOPK):
        return None
    values = torch.empty(rows, k, dtype=torch.float32)
    indices = torch.empty(rows, k, dtype=torch.long)
    threads = torch.get_num_threads()
    work = _floats(lib.px_topk_work(rows, k, threads))
    if lib.px_topk(x.data_ptr(), rows, n, k, values.data_ptr(), indices.data_ptr(), work.data_ptr(), threads):
        return None
    return values, indices


def topk(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``torch.topk(x, k)`` (values and indices of the ``k`` largest of each row, best first) of ``x`` ``(rows, n)``.

    By ``px_topk`` where no two of a row's ``k + 1`` best are equal; torch's order among equal values is its own
    (neither first-index nor stable), so with a tie there, as with NaN or what ``px_topk`` does not take, torch
    runs. Ties are rare in fp32 logits and common in bf16 ones.
    """
    n = x.shape[-1] if x.dim() == 2 else 0
    got = _native_topk(x, min(k + 1, n)) if 0 < k <= n else None
    if got is not None and not bool((got[0][:, 1:] == got[0][:, :-1]).any()):
        return got[0][:, :k], got[1][:, :k]
    return torch.topk(x, k)


def argmax(x: Tensor) -> Tensor:
    """``x.argmax(-1)`` of ``x`` ``(rows, n)``, the first index of each row's maximum, by ``px_topk`` where it runs."""
    got = _native_topk(x, 1)
    return got[1].squeeze(1) if got is not None else x.argmax(-1)
