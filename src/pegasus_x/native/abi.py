"""kernels.c's interface as ctypes sees it: ``px_layer`` (int8 scales included), the limits, the activation enum,
the signatures.

These are mirrored by hand, so kernels.c exports the same facts by name (``px_constants``) and :func:`check`
compares the two at load: a drift between the files refuses the library (the torch path runs) instead of handing
the kernels misplaced pointers or a buffer sized for another limit.
"""

from __future__ import annotations

import ctypes

VERSION = 8             # kernels.c's ABI_VERSION: raised with any change to a px_ function's arguments
MAX_ROWS = 8            # query rows per px_linear call (beyond, px_linear_rows)
MAX_DRAFT_ROWS = 72     # rows (× new positions) per px_decoder_rows / px_linear_rows / px_linear_int8 call
MAX_HEAD_DIM = 256      # px_attention's and px_decoder_rows' head_dim limit
MAX_TOPK = 256          # px_topk's k per row
HEAD_DIM_MULTIPLE = 8   # px_attention and px_decoder_rows take whole 8-float vectors of each head
# kernels.c's activation enum (ACT_RELU, ...) and the config names that select each.
ENUM = {"relu": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3, "tanh": 4}
ACTIVATIONS = {"relu": ENUM["relu"], "gelu": ENUM["gelu"], "gelu_new": ENUM["gelu_tanh"],
               "gelu_fast": ENUM["gelu_tanh"], "gelu_pytorch_tanh": ENUM["gelu_tanh"], "silu": ENUM["silu"],
               "swish": ENUM["silu"], "tanh": ENUM["tanh"]}
# kernels.c's key/value formats (KV_F32, KV_BF16, KV_I8) by tensor dtype: int8 rows come with fp32 row scales.
KV = {"f32": 0, "bf16": 1, "int8": 2}

_i64, _int, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
POINTERS = ("ln1_w", "ln1_b", "q", "k", "v", "o", "ln2_w", "ln2_b", "cq", "co", "ln3_w", "ln3_b", "fc1_w", "fc1_b",
            "fc2_w", "fc2_b", "self_k", "self_v", "cross_k", "cross_v", "keep")
# int8 weights: the fp32 row scales of each product, by the weight field they scale (NULL: that weight is not int8).
SCALES = {"q": "q_s", "k": "k_s", "v": "v_s", "o": "o_s", "cq": "cq_s", "co": "co_s", "fc1_w": "fc1_s",
          "fc2_w": "fc2_s"}


class Layer(ctypes.Structure):
    """``px_layer``: one decoder layer's tensors and sizes for ``px_decoder_rows``. Fill it by field name."""

    _fields_ = ([(name, _ptr) for name in POINTERS]
                + [(name, _i64) for name in ("R", "B", "H", "hd", "ffn", "max_len", "S")]
                + [("bf16", _int), ("activation", _int), ("eps", ctypes.c_float)]
                + [(name, _ptr) for name in SCALES.values()] + [("cross_kv", _int), ("cross_ks", _ptr),
                                                                ("cross_vs", _ptr)])


class _Constant(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("value", _i64)]


class Mismatch(Exception):
    """The loaded library's interface is not the one this module describes."""


def expected() -> dict[str, int]:
    """What ``px_constants`` must report, by name."""
    facts = {"abi": VERSION, "max_rows": MAX_ROWS, "max_draft_rows": MAX_DRAFT_ROWS, "max_head_dim": MAX_HEAD_DIM,
             "max_topk": MAX_TOPK,
             "px_layer": ctypes.sizeof(Layer)}
    facts.update({f"act.{name}": value for name, value in ENUM.items()})
    facts.update({f"kv.{name}": value for name, value in KV.items()})
    for name, _ in Layer._fields_:
        field = getattr(Layer, name)
        facts[f"px_layer.{name}"], facts[f"px_layer.{name}.size"] = field.offset, field.size
    return facts


def check(lib: ctypes.CDLL) -> None:
    """Compare the library's exported interface with :func:`expected`, then declare the signatures.

    Raises:
        Mismatch: naming every fact that differs (or the missing export of a library older than this check).
    """
    try:
        table = lib.px_constants
    except AttributeError as err:
        raise Mismatch("the library exports no px_constants (built from an older kernels.c)") from err
    table.restype, table.argtypes = ctypes.POINTER(_Constant), [ctypes.POINTER(_int)]
    count = _int()
    rows = table(ctypes.byref(count))
    theirs = {rows[i].name.decode(): rows[i].value for i in range(count.value)}
    ours = expected()
    differ = [f"{name}: C {theirs.get(name)}, Python {ours.get(name)}" for name in sorted(ours.keys() | theirs.keys())
              if theirs.get(name) != ours.get(name)]
    if differ:
        raise Mismatch("kernels.c and abi.py disagree on " + "; ".join(differ))
    lib.px_linear_work.argtypes, lib.px_linear_work.restype = [_i64, _i64, _int], _i64
    lib.px_linear.argtypes = [_ptr, _int, _i64, _i64, _ptr, _int, _ptr, _ptr, _ptr, _int]
    lib.px_linear_int8.argtypes = [_ptr, _ptr, _i64, _i64, _ptr, _int, _ptr, _int, _ptr, _int]
    lib.px_attention_work.argtypes, lib.px_attention_work.restype = [_i64, _i64, _i64, _int], _i64
    lib.px_attention.argtypes = [_ptr, _ptr, _ptr, _int, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _i64, _i64, _i64,
                                 _i64, _ptr, _i64, _ptr, _ptr, _int]
    lib.px_linear_rows.argtypes = [_ptr, _int, _i64, _i64, _ptr, _int, _ptr, _ptr, _ptr, _int]
    lib.px_decoder_rows_work.argtypes = [_i64, _i64, _i64, _i64, _i64, _i64, _i64, _int]
    lib.px_decoder_rows_work.restype = _i64
    lib.px_decoder_rows.argtypes = [ctypes.POINTER(Layer), _int, _i64, _i64, _ptr, _ptr, _int]
    lib.px_gemm_preferred.argtypes, lib.px_gemm_preferred.restype = [], _int
    lib.px_gemm_work.argtypes, lib.px_gemm_work.restype = [_i64, _i64, _i64, _int], _i64
    lib.px_gemm.argtypes = [_ptr, _i64, _i64, _ptr, _i64, _ptr, _ptr, _ptr, _int]
    lib.px_encoder_attention_work.argtypes = [_i64, _i64, _i64, _i64, _int]
    lib.px_encoder_attention_work.restype = _i64
    lib.px_encoder_attention.argtypes = [_ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _i64, _ptr, _ptr, _ptr, _ptr,
                                         _ptr, _ptr, _ptr, _int]
    lib.px_log_softmax.argtypes = [_ptr, _ptr, _i64, _i64, _int]
    lib.px_topk_work.argtypes, lib.px_topk_work.restype = [_i64, _int, _int], _i64
    lib.px_topk.argtypes = [_ptr, _i64, _i64, _int, _ptr, _ptr, _ptr, _int]
