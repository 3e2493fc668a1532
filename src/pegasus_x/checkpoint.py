"""Checkpoint I/O in the Hugging Face layout: safe, atomic, and strict about names and shapes.

Load = read tensors (safetensors, sharded safetensors, or ``pytorch_model.bin`` through ``weights_only``),
normalise key names (``model.`` prefix, tied-embedding aliases), check every name and shape against a model built
on the ``meta`` device, then assign the tensors without a second copy. With ``quantize``, the weights that become
int8 are quantized one at a time as they are read, never all held in their stored dtype.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch import Tensor

from .native import hugepages
from .config import CONFIG_NAME, PegasusXConfig, check_fits_in_memory
from .devices import check_device, check_dtype
from .errors import CheckpointError, InputError
from .files import atomic_write_bytes, json_text
from .generation_config import GENERATION_CONFIG, GenerationConfig
from .hub import download, is_hub_id
from .strict_json import read_object

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
# The tied trio: all three are the shared embedding; files may store any subset of them.
TIED_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
# The same trio as keys of a full model (ForConditionalGeneration), where the LM head is tied to it as well.
TIED_KEYS = tuple(f"model.{alias}" for alias in TIED_ALIASES) + ("lm_head.weight",)
# Where read_tensors may put a tensor: (file name, shape) → its final tensor, or None for a fresh one.
Destination = Callable[[str, tuple[int, ...]], "Tensor | None"]
# What read_tensors may hand each tensor to as soon as it is read: (file name, tensor) → whether it was taken.
Taker = Callable[[str, Tensor], bool]


# ---------------------------------------------------------------------------------------------------- writing
def atomic_save_tensors(tensors: dict[str, Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
                        ) -> None:
    """safetensors file written to a temporary name and renamed into place."""
    from safetensors.torch import save

    atomic_write_bytes(path, save(tensors, metadata=metadata or {"format": "pt"}))


def save_pretrained(model: torch.nn.Module, directory: str | os.PathLike) -> None:
    """``config.json`` + ``model.safetensors`` (+ ``generation_config.json``), each written atomically.

    Like the reference, only ``model.shared.weight`` is stored for the tied embedding trio.

    Raises:
        InputError: a non-finite generation option (JSON cannot hold it), or a file that cannot be written.
    """
    directory = Path(directory)
    generation = None
    if getattr(model, "generation_config", None):  # refused (NaN) before anything is written
        generation = json_text(model.generation_config.to_diff_dict(), f"the generation config of {directory}")
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    prefix = "model." if hasattr(model, "lm_head") else ""
    drop = {prefix + a for a in TIED_ALIASES}
    if model.config.tie_word_embeddings:
        drop.add("lm_head.weight")
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items() if k not in drop}
    atomic_save_tensors(tensors, directory / SAFE_WEIGHTS)
    model.config.save_pretrained(directory)
    if generation is not None:
        model.generation_config.save_pretrained(directory)


# ---------------------------------------------------------------------------------------------------- reading
def resolve(path: str | os.PathLike, **hub_kwargs: Any) -> Path:
    """A local checkpoint folder for ``path``: the folder itself, or a hub snapshot downloaded on demand."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise CheckpointError(f"{local} is a file; pass the checkpoint folder that holds config.json and the weights")
    text = str(path)
    if not is_hub_id(text):
        raise CheckpointError(f"checkpoint folder {text!r} does not exist; pass a folder with config.json and "
                              "model.safetensors, or a hub id such as google/pegasus-x-base")
    patterns = [CONFIG_NAME, GENERATION_CONFIG, "*.safetensors", SAFE_INDEX, "spiece.model", "tokenizer*.json",
                "special_tokens_map.json"]
    return download(text, patterns, what="the checkpoint", how="download the folder elsewhere and pass its path",
                    error=CheckpointError, **hub_kwargs)


def _safetensors_files(folder: Path) -> list[Path]:
    if (folder / SAFE_WEIGHTS).is_file():
        return [folder / SAFE_WEIGHTS]
    if (folder / SAFE_INDEX).is_file():
        names = _shard_names(folder / SAFE_INDEX)
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(f"{folder} lacks the shards {missing} listed in {SAFE_INDEX}; download them")
        return [folder / n for n in names]
    return []


def _shard_names(index: Path) -> list[str]:
    """The shard files a ``model.safetensors.index.json`` names, each a relative path inside its folder.

    Only the spelling is checked: a hub snapshot's shards are symlinks into the cache's blob folder, so where a
    shard's link points is not the index's business (its header is validated like any safetensors file).
    """
    fix = "re-download the index or fix it"
    weight_map = read_object(index, CheckpointError, fix=fix).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} is malformed: its \"weight_map\" must be a non-empty object of tensor name → "
                              f"shard file, got {weight_map!r:.60}; {fix}")
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointError(f"{index} is malformed: tensor {name!r} maps to {shard!r:.60}, not a file name; "
                                  f"{fix}")
        path = PurePosixPath(shard)
        if not shard.endswith(".safetensors") or path.is_absolute() or ".." in path.parts or "\\" in shard \
                or "\0" in shard:
            raise CheckpointError(f"{index} names the shard {shard!r:.200} for tensor {name!r}: a shard must be a "
                                  f".safetensors file inside the checkpoint folder (no absolute path, no '..'); {fix}")
    return sorted(set(weight_map.values()))


def read_shapes(folder: Path) -> dict[str, tuple[tuple[int, ...], str]] | None:
    """Names → (shape, dtype) from the safetensors headers alone (no tensor is read); None for a .bin folder."""
    from safetensors import safe_open

    files = _safetensors_files(folder)
    if not files:
        return None
    out = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    out[name] = (tuple(sl.get_shape()), sl.get_dtype())
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{file} is not a valid safetensors file ({exc}); re-download it") from None
    return out


def read_tensors(folder: Path, dtype: torch.dtype | None = None, into: Destination | None = None,
                 take: Taker | None = None) -> dict[str, Tensor]:
    """Every tensor of the checkpoint in ``folder`` (CPU); floating-point ones cast to ``dtype`` when given.

    Safetensors files are read with plain reads, one tensor at a time, each cast before the next is read: a memory
    map would keep every page of the file resident beside the model, and casting after reading everything would
    hold the checkpoint twice (a bf16 load from fp32 files would peak above the fp32 model's size).
    ``into(name, shape)`` may give a safetensors tensor's final place (its dtype wins over ``dtype``); the file is
    then read straight into it. ``take(name, tensor)`` is handed each tensor as soon as it is read (and cast); one
    it takes (returns True) is left out of the result, so safetensors tensors can be used up one at a time. (A
    ``pytorch_model.bin`` is read whole first.)
    """
    files = _safetensors_files(folder)
    if files:
        state: dict[str, Tensor] = {}
        for file in files:
            try:
                state.update(_read_safetensors(file, dtype, into, take))
            except CheckpointError:
                raise
            except Exception as exc:
                raise CheckpointError(f"{file} could not be read ({exc}); re-download it") from None
        return state
    file = folder / TORCH_WEIGHTS
    if not file.is_file():
        raise CheckpointError(f"no weights in {folder}: looked for {SAFE_WEIGHTS}, {SAFE_INDEX} and {TORCH_WEIGHTS}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{file} needs to run code to load ({str(exc).splitlines()[0]}), which is refused; "
                              "ask for a model.safetensors file instead") from None
    except Exception as exc:
        raise CheckpointError(f"{file} could not be read ({type(exc).__name__}: {exc}); re-download it") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{file} does not hold a flat state dict of tensors")
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return {k: v for k, v in state.items() if take is None or not take(k, v)}


def _finite(t: Tensor) -> bool:
    """No NaN/inf in ``t``; checked a slice at a time because isfinite's temporaries are as big as its input."""
    return all(bool(torch.isfinite(part).all()) for part in t.reshape(-1).split(1 << 22))


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _read_safetensors(file: Path, dtype: torch.dtype | None, into: Destination | None, take: Taker | None
                      ) -> dict[str, Tensor]:
    """Tensors of one safetensors file (header already validated by :func:`read_shapes`)."""
    out: dict[str, Tensor] = {}
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            stored = _SAFETENSORS_DTYPES.get(info["dtype"])
            if stored is None:
                raise CheckpointError(f"{file}: tensor {name} has dtype {info['dtype']}, not a floating-point type")
            start, end = info["data_offsets"]
            f.seek(8 + size + start)
            dest = into(name, tuple(info["shape"])) if into is not None else None
            if dest is not None and dest.dtype == stored:
                buf = dest.view(-1).view(torch.uint8).numpy()          # no copy: the file lands in place
            else:
                buf = bytearray(end - start)
            if f.readinto(buf) != end - start:
                raise CheckpointError(f"{file} is truncated (tensor {name}); re-download it")
            if dest is not None:
                if dest.dtype != stored:
                    dest.copy_(torch.frombuffer(buf, dtype=stored).view(dest.shape))
                out[name] = dest
                continue
            t = torch.frombuffer(buf, dtype=stored) if buf else torch.empty(0, dtype=stored)
            t = t.view(info["shape"])
            t = t.to(dtype) if dtype is not None else t
            if take is None or not take(name, t):
                out[name] = t
            del t, buf                                      # a taken tensor's memory goes before the next read
    return out


def _into_arena(arena: hugepages.Arena, names: set[str], dtype: torch.dtype) -> Destination:
    """Where :func:`read_tensors` puts each tensor: the ones in ``names`` in ``arena`` (as ``dtype``), others fresh."""
    return lambda name, shape: arena.empty(shape, dtype) if name in names else None


def normalise_keys(names: list[str], with_head: bool) -> dict[str, str]:
    """Map file key → our key: add/strip the ``model.`` prefix; aliases of the tied embedding map to ``shared``."""
    prefix = "model." if with_head else ""
    out = {}
    for name in names:
        bare = name[len("model."):] if name.startswith("model.") else name
        if bare == "lm_head.weight" or name == "lm_head.weight":
            out[name] = "lm_head.weight"
            continue
        if bare in TIED_ALIASES:
            bare = "shared.weight"
        out[name] = prefix + bare
    return out


def _kept(names: list[str], expected: dict[str, tuple[int, ...]], with_head: bool, tied: bool) -> dict[str, str]:
    """File name → our name of the tensors the model takes: the first alias of each, no LM head when tied."""
    out: dict[str, str] = {}
    for name, ours in normalise_keys(names, with_head).items():
        if ours in expected and ours not in out.values() and not (tied and ours == "lm_head.weight"):
            out[name] = ours
    return out


def _expected(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the model's own (de-duplicated) parameters."""
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def load_pretrained(cls, path: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
                    device: torch.device | str | None = None, strict: bool = False, quantize: str | None = None,
                    kv_dtype: torch.dtype | str | None = None, **hub_kwargs: Any):
    """See :meth:`PegasusXPreTrainedModel.from_pretrained`."""
    from .quantize import check_kv_dtype, check_mode, check_on_cpu, quantize_as_loaded, set_kv_dtype

    # Every argument is checked before a possibly long download or read.
    dtype = check_dtype(dtype)
    device = check_device("cpu" if device is None else device)
    check_mode(quantize)
    check_kv_dtype(kv_dtype)
    check_on_cpu(device, quantize=quantize, kv_dtype=kv_dtype)
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"path must be a checkpoint folder or a hub id (a str or os.PathLike), got "
                         f"{type(path).__name__}; e.g. from_pretrained('google/pegasus-x-base')")
    folder = resolve(path, **hub_kwargs)
    config = PegasusXConfig.from_pretrained(folder)
    shapes = read_shapes(folder)
    check_fits_in_memory(config, bytes_per_value(dtype, shapes))
    with torch.device("meta"):
        model = cls(config, init=False)
    expected = _expected(model)
    with_head = hasattr(model, "lm_head")
    # Our name → quantizer of the weights that become int8: their layers are int8 from here on.
    pending = quantize_as_loaded(model, quantize) if quantize is not None else {}

    tied = with_head and config.tie_word_embeddings
    on_cpu = device.type == "cpu"
    bad: list[str] = []

    def take(name: str, t: Tensor) -> bool:
        """Quantize a weight that becomes int8 as soon as it is read (in the model's dtype, as a loaded model's)."""
        ours = kept.get(name)
        if ours not in pending:
            return False
        t = t.to(target_dtype)
        if not _finite(t):
            bad.append(ours)
        pending.pop(ours)(t)
        return True

    into = None
    if shapes is not None:                         # validate before materialising anything
        _check_names_shapes({k: v[0] for k, v in shapes.items()}, expected, with_head, folder)
        _check_dtypes({k: v[1] for k, v in shapes.items()}, folder)
        kept = _kept(list(shapes), expected, with_head, tied)
        target_dtype = _target_dtype(dtype, _SAFETENSORS_DTYPES[shapes[next(iter(kept))][1]])
        if on_cpu and hugepages.supported():
            # Decoding streams the weights every token: read them straight into 2 MB pages (hugepages.py).
            # Weights quantized as read go to ordinary memory instead, freed once quantized.
            placed = {name for name, ours in kept.items() if ours not in pending}
            arena = hugepages.Arena(sum(hugepages.nbytes(shapes[name][0], target_dtype) for name in placed))
            into = _into_arena(arena, placed, target_dtype)
    state = read_tensors(folder, dtype, into, take if shapes is not None else None)
    if shapes is None:
        _check_names_shapes({k: tuple(v.shape) for k, v in state.items()}, expected, with_head, folder)
        _check_dtypes({k: str(v.dtype) for k, v in state.items()}, folder)
        kept = _kept(list(state), expected, with_head, tied)
        target_dtype = _target_dtype(dtype, state[next(iter(kept))].dtype)
        state = {name: t for name, t in state.items() if not take(name, t)}

    loaded = {ours: state[name] for name, ours in kept.items() if name in state}
    del state                                      # `loaded` holds the only references: casts below free as they go
    bad += [name for name, t in loaded.items() if t.is_floating_point() and not _finite(t)]
    for name, t in loaded.items():
        loaded[name] = t.to(device=device, dtype=target_dtype)
    if bad:
        msg = f"{folder} holds NaN/inf values in {', '.join(bad[:5])}{' …' if len(bad) > 5 else ''}"
        if strict:
            raise CheckpointError(msg + "; the checkpoint is damaged — re-download or retrain it")
        warnings.warn(msg + "; outputs will be garbage", stacklevel=3)
    model.load_state_dict(loaded, strict=False, assign=True)
    if "lm_head.weight" in pending:                # tied: the int8 head is quantized from the kept embedding
        pending.pop("lm_head.weight")(model.get_input_embeddings().weight)
    elif with_head:
        model.tie_weights()
    model.generation_config = GenerationConfig.from_pretrained(folder)
    set_kv_dtype(model, kv_dtype)
    model.eval()
    return model


def loaded_dtypes(shapes: dict[str, tuple[tuple[int, ...], str]] | None) -> list[torch.dtype]:
    """The dtypes the stored floating-point tensors load in without ``dtype=`` (fp16 as fp32; see
    :func:`_target_dtype`), smallest first; empty for a .bin folder (``shapes`` None)."""
    stored = {_SAFETENSORS_DTYPES[d] for _, d in (shapes or {}).values() if d in _SAFETENSORS_DTYPES}
    return sorted({_target_dtype(None, t) for t in stored}, key=lambda t: t.itemsize)


def bytes_per_value(requested: torch.dtype | None, shapes: dict[str, tuple[tuple[int, ...], str]] | None) -> int:
    """Bytes per parameter of the loaded model, at least: the dtype asked for, else the smallest it loads in, else
    (a .bin, read later) bf16's."""
    return (requested or (loaded_dtypes(shapes) or [torch.bfloat16])[0]).itemsize


def _target_dtype(requested: torch.dtype | None, stored: torch.dtype) -> torch.dtype:
    """The model's dtype: the one asked for, else the checkpoint's (fp16 checkpoints load as fp32)."""
    found = requested or stored
    return torch.float32 if found == torch.float16 else found


def _check_dtypes(dtypes: dict[str, str], folder: Path) -> None:
    floating = ("F64", "F32", "F16", "BF16", "torch.float64", "torch.float32", "torch.float16", "torch.bfloat16")
    bad = [f"{k} ({v})" for k, v in dtypes.items() if v not in floating]
    if bad:
        raise CheckpointError(f"the weights in {folder} hold tensors that are not a floating-point type: "
                              f"{', '.join(bad[:5])}; the file is not a PEGASUS-X checkpoint or is damaged")


def _check_names_shapes(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], with_head: bool,
                        folder: Path) -> None:
    mapping = normalise_keys(list(found), with_head)
    problems = []
    unexpected = [k for k, ours in mapping.items() if ours not in expected and ours != "lm_head.weight"]
    have = set(mapping.values())
    missing = [k for k in expected if k not in have]
    mismatched = [f"{k}: file {found[k]} vs model {expected[ours]}" for k, ours in mapping.items()
                  if ours in expected and tuple(found[k]) != expected[ours]]
    if missing:
        problems.append(f"missing {len(missing)}: {', '.join(missing[:8])}{' …' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {', '.join(unexpected[:8])}"
                        f"{' …' if len(unexpected) > 8 else ''}")
    if mismatched:
        problems.append(f"shape mismatch {len(mismatched)}: {'; '.join(mismatched[:8])}")
    if problems:
        raise CheckpointError(f"the weights in {folder} do not match its config.json — " + " | ".join(problems)
                              + "; check that config.json belongs to these weights")
