"""The PEGASUS SentencePiece tokenizer: checkpoint-exact, fast, on the ``tokenizers`` backend.

Vocabulary layout (96,103 ids for the released checkpoints, ``offset`` = 103)::

    0 <pad>   1 </s>   2 <mask_1> (sentence mask)   3 <mask_2> (word mask)
    4..104 <unk_2>..<unk_102>      k + 103 = SentencePiece piece k (<unk> = 105, <n> = 106)

Only ``</s>`` is appended (no BOS). Special-token strings written inside a text map to their ids.

Whitespace: ids follow the checkpoint's ``tokenizer.json`` and the original SentencePiece model,
which drop whitespace at the ends of a text and next to special tokens. transformers 5 rebuilds the
pre-tokenizer without that split, so on texts such as ``"a <mask_2> b"`` or ``"doc\\n"`` it emits an
extra lone ``"▁"`` (id 110) that PEGASUS never saw in training; on all other texts ids are identical.

Newlines: by default ``"\\n"`` is plain whitespace, as in the Hugging Face tokenizer (which never
produces the ``<n>`` piece). ``newline_to_n=True`` follows the original PEGASUS pipeline instead:
``"\\n"`` becomes the ``<n>`` piece on encode, and ``<n>`` becomes ``"\\n"`` on decode.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram

from .errors import TokenizerError
from .files import atomic_write_bytes
from .hub import download, is_hub_id
from .strict_json import read_object

TOKENIZER_FILE, SPM_FILE = "tokenizer.json", "spiece.model"
CONFIG_FILE, SPECIAL_MAP_FILE = "tokenizer_config.json", "special_tokens_map.json"
DEFAULT_MODEL_MAX_LENGTH = 16384  # PEGASUS-X's input length
NEWLINE_PIECE = "<n>"
_ABSURD_MAX_LENGTH = 10**7  # HF configs store 1e30 to mean "no limit known"
_MAX_OFFSET = 2**16         # ids before the SentencePiece pieces; saving writes one <unk_i> name for each
_SPECIAL_DEFAULTS = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
                     "mask_token": "<mask_2>", "mask_token_sent": "<mask_1>"}
# The classic detokenizer clean-up (spaces before punctuation and in English contractions).
_CLEANUPS = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]


class BatchEncoding(dict):
    """Model inputs (``input_ids``, ``attention_mask``, maybe ``labels``); keys are also attributes, and
    :meth:`to` moves the tensors, as with transformers' BatchEncoding."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: Any) -> BatchEncoding:
        """Move every tensor to ``device`` (a device, or a string such as "cuda"); returns this encoding.

        Raises:
            TokenizerError: ``device`` is not a device (transformers allows only devices here too).
        """
        import torch  # lazy: tokenizer-only tools should not pay for importing torch

        if not isinstance(device, (str, int, torch.device)) or isinstance(device, bool):
            raise TokenizerError(f"BatchEncoding.to() takes a device such as 'cpu' or 'cuda', got {device!r}")
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                self[key] = value.to(device)
        return self


class PegasusTokenizer:
    """PEGASUS tokenizer. Build it with :meth:`from_pretrained` or :meth:`pegasus`.

    Calls never change the backend's state (truncation and padding are done here, per call), so one
    instance can be shared between threads.
    """

    def __init__(self, backend: Tokenizer, *, config: dict | None = None, special_map: dict | None = None,
                 spm_model: bytes | None = None, newline_to_n: bool = False,
                 model_max_length: int | None = None) -> None:
        self._backend = backend
        backend.no_truncation()  # tokenizer.json files may carry a fixed truncation/padding
        backend.no_padding()
        self._config, self._special_map = dict(config or {}), dict(special_map or {})
        self._spm_model = spm_model
        self.newline_to_n = newline_to_n
        self.offset = int(self._config.get("offset", 103))
        self.clean_up_tokenization_spaces = bool(self._config.get("clean_up_tokenization_spaces", False))
        tokens = _special_tokens(self._config, self._special_map)
        for name in ("pad_token", "eos_token", "unk_token"):
            if backend.token_to_id(tokens[name]) is None:
                raise TokenizerError(f"the vocabulary has no {name} {tokens[name]!r}; expected PEGASUS's")
        if newline_to_n and backend.token_to_id(NEWLINE_PIECE) is None:
            raise TokenizerError(f"newline_to_n=True needs the {NEWLINE_PIECE!r} piece; the vocabulary lacks it")
        self.pad_token, self.eos_token, self.unk_token, self.mask_token, self.mask_token_sent = tokens.values()
        # Plain attributes, not properties: the ids are fixed once the vocabulary is loaded.
        (self.pad_token_id, self.eos_token_id, self.unk_token_id, self.mask_token_id,
         self.mask_token_sent_id) = (backend.token_to_id(t) for t in tokens.values())
        limit = model_max_length if model_max_length is not None else self._config.get("model_max_length")
        sane = isinstance(limit, (int, float)) and 0 < limit <= _ABSURD_MAX_LENGTH
        self.model_max_length = int(limit) if sane else DEFAULT_MODEL_MAX_LENGTH

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, newline_to_n: bool = False,
                        model_max_length: int | None = None, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                        token: str | bool | None = None) -> PegasusTokenizer:
        """Load from a folder, or from a Hugging Face Hub id such as ``"google/pegasus-x-large"``.

        Args:
            name_or_path: folder with ``tokenizer.json`` (preferred) or ``spiece.model``, and
                optionally ``tokenizer_config.json`` / ``special_tokens_map.json``; or a Hub id
                (downloaded with ``huggingface_hub`` when it is installed).
            newline_to_n: map ``"\\n"`` to the ``<n>`` piece and back (original PEGASUS pipeline).
            model_max_length: override the config's limit (used by ``truncation=True`` without
                ``max_length`` and by ``padding="max_length"``); 16384 when absent or absurd.
            revision, cache_dir, local_files_only, token: for a Hub id, as in ``huggingface_hub`` (ignored for a
                folder).

        Returns:
            The tokenizer.

        Raises:
            TokenizerError: missing folder, no tokenizer file, invalid file, or Hub download impossible.
        """
        folder = _resolve_folder(name_or_path, dict(revision=revision, cache_dir=cache_dir,
                                                    local_files_only=local_files_only, token=token))
        config, special_map = _read_json(folder / CONFIG_FILE), _read_json(folder / SPECIAL_MAP_FILE)
        _check_files(config, special_map, folder)
        spm = None
        if (folder / TOKENIZER_FILE).is_file():
            try:
                backend = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
            except Exception as exc:  # the Rust side raises a bare Exception for any parse error
                raise TokenizerError(f"cannot load {str(folder / TOKENIZER_FILE)!r}: {exc}") from exc
        elif (folder / SPM_FILE).is_file():
            spm = (folder / SPM_FILE).read_bytes()
            backend = _backend_from_spm(spm, config, special_map)
        else:
            raise TokenizerError(f"no {TOKENIZER_FILE} or {SPM_FILE} in tokenizer folder {str(folder)!r}; "
                                 "expected a PEGASUS tokenizer folder holding one of them")
        return cls(backend, config=config, special_map=special_map, spm_model=spm,
                   newline_to_n=newline_to_n, model_max_length=model_max_length)

    @classmethod
    def pegasus(cls, *, newline_to_n: bool = False,
                model_max_length: int | None = DEFAULT_MODEL_MAX_LENGTH) -> PegasusTokenizer:
        """Load the PEGASUS vocabulary shipped inside the package (offline).

        Args:
            newline_to_n: see :meth:`from_pretrained`.
            model_max_length: 16384 (PEGASUS-X) by default, not the shipped config's 1024; ``None``
                uses the config's value.
        """
        assets = resources.files(__package__).joinpath("assets", "pegasus-tokenizer")
        # Read through the Traversable, not a filesystem path, so zipped installs work too.
        read = lambda name: assets.joinpath(name).read_text(encoding="utf-8")  # noqa: E731
        return cls(Tokenizer.from_str(read(TOKENIZER_FILE)), config=json.loads(read(CONFIG_FILE)),
                   special_map=json.loads(read(SPECIAL_MAP_FILE)), newline_to_n=newline_to_n,
                   model_max_length=model_max_length)

    def save_pretrained(self, folder: str | os.PathLike) -> list[str]:
        """Write the tokenizer files into ``folder`` (created if needed), each one atomically.

        Args:
            folder: destination folder.

        Returns:
            Paths written: ``tokenizer.json`` (``spiece.model`` for a SentencePiece-loaded tokenizer),
            ``tokenizer_config.json``, ``special_tokens_map.json``. Raises TokenizerError when
            ``folder`` is a file.
        """
        out = Path(folder)
        if out.exists() and not out.is_dir():
            raise TokenizerError(f"cannot save the tokenizer: {str(out)!r} exists and is not a folder")
        out.mkdir(parents=True, exist_ok=True)
        names = dict(pad_token=self.pad_token, eos_token=self.eos_token, unk_token=self.unk_token,
                     mask_token=self.mask_token)
        config = {**self._config, **names, "mask_token_sent": self.mask_token_sent, "offset": self.offset,
                  "model_max_length": self.model_max_length, "tokenizer_class": "PegasusTokenizer"}
        special_map = self._special_map or {**names, "additional_special_tokens": [self.mask_token_sent] + [
            f"<unk_{i}>" for i in range(2, self.offset)]}
        if self._spm_model is not None:
            files = {SPM_FILE: self._spm_model}
        else:
            files = {TOKENIZER_FILE: self._backend.to_str().encode("utf-8")}
        for name, data in ((CONFIG_FILE, config), (SPECIAL_MAP_FILE, special_map)):
            files[name] = json.dumps(data, indent=2, ensure_ascii=False).encode("utf-8")
        for name, data in files.items():
            atomic_write_bytes(out / name, data)
        return [str(out / name) for name in files]

    # ------------------------------------------------------------------ encoding
    def __call__(self, text: str | Sequence[str] | None = None, *,
                 text_target: str | Sequence[str] | None = None, max_length: int | None = None,
                 truncation: bool | str | None = None, padding: bool | str = False,
                 return_tensors: str | None = None, add_special_tokens: bool = True) -> BatchEncoding:
        """Tokenize a text or a batch, like the Hugging Face tokenizer's ``__call__``.

        Args:
            text: a string or a list of strings (the encoder input).
            text_target: target text(s), returned as ``labels`` (padded with the pad id 0, as
                transformers does), or as ``input_ids`` when ``text`` is None.
            max_length: length for truncation and ``"max_length"`` padding (default ``model_max_length``).
            truncation: True / ``"longest_first"`` cuts sequences to ``max_length``, keeping the final
                ``</s>``. None (default) truncates only when ``max_length`` is given and padding is
                off, like transformers.
            padding: False, True / ``"longest"`` (longest in the batch) or ``"max_length"``; on the right.
            return_tensors: None (lists) or ``"pt"`` (int64 torch tensors, shape (batch, length)).
            add_special_tokens: append ``</s>``.

        Returns:
            A :class:`BatchEncoding` with ``input_ids`` and ``attention_mask`` (and ``labels``); flat
            lists for a single string without tensors.

        Raises:
            TokenizerError: a text is not a string, an option is invalid, or tensors were asked for
                rows of different lengths.
        """
        if text is None and text_target is None:
            raise TokenizerError("expected text or text_target (a str or a list of str), got neither")
        pad_mode = _padding_mode(padding)
        if truncation is None:
            truncate = max_length is not None and pad_mode is None
        else:
            truncate = truncation not in (False, "do_not_truncate")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise TokenizerError(f"max_length must be a positive int, got {max_length!r}")
        if return_tensors not in (None, "pt"):
            raise TokenizerError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        length = max_length if max_length is not None else self.model_max_length
        options = dict(limit=length if truncate else None, pad_mode=pad_mode, pad_to=length,
                       tensors=return_tensors is not None, add_special_tokens=add_special_tokens)
        batched, texts = _as_batch(*((text, "text") if text is not None else (text_target, "text_target")))
        result = self._encode_batch(texts, batched, **options)
        if text is not None and text_target is not None:
            target_batched, targets = _as_batch(text_target, "text_target")
            if target_batched != batched or len(targets) != len(texts):
                raise TokenizerError(f"text and text_target must match: got {len(texts)} text(s) "
                                     f"and {len(targets)} target(s)")
            result["labels"] = self._encode_batch(targets, batched, **options)["input_ids"]
        return result

    def encode(self, text: str, *, add_special_tokens: bool = True, max_length: int | None = None,
               truncation: bool | str | None = None) -> list[int]:
        """Token ids of one text.

        Args:
            text: the text; ``add_special_tokens``, ``max_length`` and ``truncation`` as in ``__call__``.

        Returns:
            The ids. Raises TokenizerError when ``text`` is not a string.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode() expects a str, got {type(text).__name__}")
        return self(text, max_length=max_length, truncation=truncation,
                    add_special_tokens=add_special_tokens)["input_ids"]

    def _encode_batch(self, texts: list[str], batched: bool, *, limit: int | None, pad_mode: str | None,
                      pad_to: int, tensors: bool, add_special_tokens: bool) -> BatchEncoding:
        if self.newline_to_n:
            texts = [t.replace("\n", NEWLINE_PIECE) for t in texts]
        # encode_batch_fast runs the batch in parallel in Rust and skips the offsets we never use.
        encodings = self._backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)
        rows = [enc.ids for enc in encodings]
        if limit is not None:  # cutting after encoding equals the backend's own truncation
            if add_special_tokens:  # keep the appended </s> last
                rows = [r if len(r) <= limit else r[:limit - 1] + r[-1:] for r in rows]
            else:
                rows = [r[:limit] for r in rows]
        lengths = [len(r) for r in rows]
        width = max(lengths, default=0) if pad_mode == "longest" else pad_to if pad_mode else None
        if width is not None:  # rows longer than a "max_length" width stay longer, as in transformers
            rows = [r + [self.pad_token_id] * (width - len(r)) if len(r) < width else r for r in rows]
        if tensors:
            return _to_tensors(rows, lengths)
        masks = [[1] * n + [0] * (len(r) - n) for r, n in zip(rows, lengths, strict=True)]
        if batched:
            return BatchEncoding(input_ids=rows, attention_mask=masks)
        return BatchEncoding(input_ids=rows[0], attention_mask=masks[0])

    # ------------------------------------------------------------------ decoding
    def decode(self, ids: Any, *, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        """Text of one id sequence.

        Args:
            ids: a list of ints, a 1-D tensor or array, or one int.
            skip_special_tokens: drop ``<pad>``, ``</s>``, ``<unk>``, the masks and ``<unk_N>``.
            clean_up_tokenization_spaces: remove spaces before punctuation and inside contractions
                (default: the config's setting, off for PEGASUS).

        Returns:
            The text.

        Raises:
            TokenizerError: ``ids`` is not a flat sequence of non-negative ints.
        """
        ids = _id_list(ids)
        if ids and isinstance(ids[0], list):
            raise TokenizerError("decode() got a batch of sequences; use batch_decode()")
        return self.batch_decode([ids], skip_special_tokens=skip_special_tokens,
                                 clean_up_tokenization_spaces=clean_up_tokenization_spaces)[0]

    def batch_decode(self, sequences: Any, *, skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: bool | None = None) -> list[str]:
        """Texts of a batch of id sequences (a list of lists, or a 2-D tensor or array).

        Args:
            sequences: the batch; the keyword options are those of :meth:`decode`.

        Returns:
            One text per sequence. Raises TokenizerError when a row is not non-negative int ids.
        """
        rows = [_id_list(row) for row in _id_list(sequences)]
        try:
            texts = self._backend.decode_batch(rows, skip_special_tokens=skip_special_tokens)
        except (TypeError, OverflowError) as exc:
            raise TokenizerError(f"expected sequences of non-negative int ids: {exc}") from exc
        if self.newline_to_n:
            texts = [t.replace(NEWLINE_PIECE, "\n") for t in texts]
        clean_up = clean_up_tokenization_spaces
        if self.clean_up_tokenization_spaces if clean_up is None else clean_up:
            for old, new in _CLEANUPS:
                texts = [t.replace(old, new) for t in texts]
        return texts

    # ------------------------------------------------------------------ vocabulary
    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        """Id of a token, or ids of a list of tokens; unknown tokens give ``unk_token_id``."""
        if isinstance(tokens, str):
            found = self._backend.token_to_id(tokens)
            return self.unk_token_id if found is None else found
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int], *,
                              skip_special_tokens: bool = False) -> str | list[str]:
        """Token of an id, or tokens of a list of ids; raises TokenizerError outside the vocabulary."""
        if isinstance(ids, int):
            token = self._backend.id_to_token(ids) if ids >= 0 else None
            if token is None:
                raise TokenizerError(f"id {ids} is outside the vocabulary (0..{len(self) - 1})")
            return token
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self.convert_ids_to_tokens(i) for i in _id_list(ids) if i not in skip]

    def get_vocab(self) -> dict[str, int]:
        """Token → id for the whole vocabulary, special tokens included."""
        return self._backend.get_vocab(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        """Number of ids (96,103 for PEGASUS)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of every special token (pad, eos, unk, the masks, ``<unk_N>``), sorted."""
        return sorted(i for i, tok in self._backend.get_added_tokens_decoder().items() if tok.special)

    @property
    def backend_tokenizer(self) -> Tokenizer:
        """The underlying ``tokenizers.Tokenizer`` (set no truncation or padding on it)."""
        return self._backend

    def __repr__(self) -> str:
        source = SPM_FILE if self._spm_model is not None else TOKENIZER_FILE
        return (f"PegasusTokenizer(vocab_size={self.vocab_size}, source={source!r}, "
                f"model_max_length={self.model_max_length}, newline_to_n={self.newline_to_n})")


# ---------------------------------------------------------------------- helpers
def _special_tokens(config: dict, special_map: dict) -> dict[str, str]:
    merged = {**config, **special_map}
    tokens = {}
    for key, default in _SPECIAL_DEFAULTS.items():  # insertion order: pad, eos, unk, mask, mask_sent
        value = merged.get(key) or default
        tokens[key] = value.get("content", default) if isinstance(value, dict) else str(value)
    return tokens


def _padding_mode(padding: bool | str) -> str | None:
    if padding in (False, None, "do_not_pad"):
        return None
    if padding in (True, "longest", "max_length"):
        return "longest" if padding is True else padding
    raise TokenizerError(f"padding must be False, True, 'longest' or 'max_length', got {padding!r}")


def _as_batch(value: Any, name: str) -> tuple[bool, list[str]]:
    """(is_batch, texts), or a TokenizerError saying what was expected."""
    if isinstance(value, str):
        return False, [value]
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise TokenizerError(f"{name}[{i}] is {type(item).__name__}; expected every item to be a str")
        return True, list(value)
    hint = " (decode bytes first, e.g. data.decode('utf-8'))" if isinstance(value, (bytes, bytearray)) else ""
    raise TokenizerError(f"{name} must be a str or a list of str, got {type(value).__name__}{hint}")


def _id_list(ids: Any) -> list:
    if hasattr(ids, "tolist"):  # torch tensors and numpy arrays
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    if not isinstance(ids, (list, tuple)):
        raise TokenizerError(f"expected token ids (a list of int or a tensor), got {type(ids).__name__}")
    return list(ids)


def _to_tensors(rows: list[list[int]], lengths: list[int]) -> BatchEncoding:
    import torch  # lazy: tokenizer-only tools should not pay for importing torch

    if len(set(map(len, rows))) > 1:
        raise TokenizerError(f"cannot stack rows of lengths {sorted(set(map(len, rows)))} into a tensor; "
                             "pass padding=True (or truncation=True with padding='max_length')")
    width = len(rows[0]) if rows else 0
    ids = torch.tensor(rows, dtype=torch.long).reshape(len(rows), width)
    mask = (torch.arange(width) < torch.tensor(lengths, dtype=torch.long)[:, None]).long()
    return BatchEncoding(input_ids=ids, attention_mask=mask)


def _resolve_folder(name_or_path: Any, hub_kwargs: dict[str, Any]) -> Path:
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TokenizerError(f"expected a folder path or a Hub id, got {type(name_or_path).__name__}")
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists():
        raise TokenizerError(f"{str(path)!r} is a file; expected a folder with {TOKENIZER_FILE} or {SPM_FILE}")
    if is_hub_id(str(name_or_path)):
        how = (f"download {TOKENIZER_FILE} (or {SPM_FILE}), {CONFIG_FILE} and {SPECIAL_MAP_FILE} from "
               f"https://huggingface.co/{name_or_path} into a folder and pass that folder's path")
        return download(str(name_or_path), [TOKENIZER_FILE, SPM_FILE, CONFIG_FILE, SPECIAL_MAP_FILE],
                        what="the tokenizer", how=how, error=TokenizerError, **hub_kwargs)
    raise TokenizerError(f"tokenizer folder {str(path)!r} does not exist; expected a folder holding "
                         f"{TOKENIZER_FILE} or {SPM_FILE}, or a Hub id like 'google/pegasus-x-large'")


def _read_json(path: Path) -> dict:
    """A tokenizer JSON file's object; {} when the folder has no such file (both files are optional)."""
    if not path.is_file():
        return {}
    return read_object(path, TokenizerError, fix="re-download the tokenizer files or fix this one")


def _check_files(config: dict, special_map: dict, folder: Path) -> None:
    """Refuse values of the wrong type before they are used: ``int("x")`` would be a traceback, ``"false"`` true."""
    offset = config.get("offset", 103)
    if isinstance(offset, bool) or not isinstance(offset, int) or not 2 <= offset <= _MAX_OFFSET:
        raise TokenizerError(f"{folder / CONFIG_FILE}: \"offset\" must be an integer in [2, {_MAX_OFFSET}] (103 for "
                             f"PEGASUS), got {offset!r:.60}; fix it or re-download the tokenizer files")
    clean_up = config.get("clean_up_tokenization_spaces", False)
    if not isinstance(clean_up, bool):
        raise TokenizerError(f"{folder / CONFIG_FILE}: \"clean_up_tokenization_spaces\" must be true or false (a "
                             f"JSON boolean, not a string), got {clean_up!r:.60}")
    for file, data in ((SPECIAL_MAP_FILE, special_map), (CONFIG_FILE, config)):
        for key in _SPECIAL_DEFAULTS:
            value = data.get(key)
            content = value.get("content") if isinstance(value, dict) else value
            if value is not None and not isinstance(content, str):
                raise TokenizerError(f"{folder / file}: \"{key}\" must be a token string such as "
                                     f"{_SPECIAL_DEFAULTS[key]!r} (or an object with such a \"content\"), got "
                                     f"{value!r:.60}; fix it or re-download the tokenizer files")


def _backend_from_spm(model: bytes, config: dict, special_map: dict) -> Tokenizer:
    """The pipeline a PEGASUS tokenizer.json holds, built from a SentencePiece model.

    Pieces 0 and 1 of a PEGASUS SentencePiece model are <pad> and </s>; the fixed head (<pad>, </s>,
    <mask_1>, <mask_2>, <unk_2>..) takes their place so that piece k gets id k + offset.
    """
    try:
        import sentencepiece
    except ImportError:
        raise TokenizerError(f"reading {SPM_FILE} needs sentencepiece (pip install 'pegasus-x[spm]'); "
                             f"or use a folder with {TOKENIZER_FILE}") from None
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(model)
    except Exception as exc:  # RuntimeError or OSError depending on the sentencepiece version
        raise TokenizerError(f"{SPM_FILE} is not a valid SentencePiece model: {exc}") from exc
    if sp.pad_id() != 0 or sp.eos_id() != 1:
        raise TokenizerError(f"{SPM_FILE} must have <pad> = 0 and </s> = 1 like PEGASUS models "
                             f"(it has pad_id={sp.pad_id()}, eos_id={sp.eos_id()})")
    tokens = _special_tokens(config, special_map)
    offset = int(config.get("offset", 103))
    head = [tokens["pad_token"], tokens["eos_token"], tokens["mask_token_sent"], tokens["mask_token"]]
    unks = [f"<unk_{i}>" for i in range(2, offset)]
    vocab = [(t, 0.0) for t in head] + [(t, -100.0) for t in unks]
    vocab += [(sp.id_to_piece(i), sp.get_score(i)) for i in range(2, sp.get_piece_size())]
    backend = Tokenizer(Unigram(vocab, unk_id=sp.unk_id() + offset, byte_fallback=False))
    charsmap = _precompiled_charsmap(model)
    steps = [normalizers.Precompiled(charsmap)] if charsmap else []
    backend.normalizer = normalizers.Sequence(steps + [normalizers.Replace(Regex(" {2,}"), " ")])
    # WhitespaceSplit reproduces SentencePiece dropping whitespace at the ends of segments.
    metaspace = dict(replacement="▁", prepend_scheme="always", split=True)
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                     pre_tokenizers.Metaspace(**metaspace)])
    backend.decoder = decoders.Metaspace(**metaspace)
    eos = tokens["eos_token"]
    backend.post_processor = processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A $B {eos}",
                                                           special_tokens=[(eos, 1)])
    specials = head + unks + [sp.id_to_piece(sp.unk_id())]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return backend


def _precompiled_charsmap(model: bytes) -> bytes:
    """ModelProto.normalizer_spec (field 3).precompiled_charsmap (field 2), read without protobuf."""
    spec = next((value for field, value in _proto_fields(model) if field == 3), b"")
    return next((value for field, value in _proto_fields(spec) if field == 2), b"")


def _proto_fields(buf: bytes) -> Iterator[tuple[int, Any]]:
    """(field number, value) pairs of a serialized protobuf message, one level deep."""
    pos = 0

    def varint() -> int:
        nonlocal pos
        result = shift = 0
        while buf[pos] & 0x80:
            result, pos, shift = result | (buf[pos] & 0x7F) << shift, pos + 1, shift + 7
        pos += 1
        return result | (buf[pos - 1] << shift)

    while pos < len(buf):
        key = varint()
        if key & 7 not in (0, 1, 2, 5):
            raise TokenizerError(f"{SPM_FILE} is not a valid SentencePiece model (protobuf wire type {key & 7})")
        if key & 7 == 0:
            yield key >> 3, varint()
        else:  # fixed64, fixed32, or a length-delimited payload
            size = {1: 8, 5: 4}.get(key & 7) or varint()
            pos += size
            yield key >> 3, buf[pos - size:pos]
