"""PegasusTokenizer against the transformers 5.23 tokenizer and raw SentencePiece.

Two transformers oracles are used on the real vocabulary:

* ``hf``: ``AutoTokenizer`` loaded from the folder, unchanged. transformers 5 rebuilds the
  pre-tokenizer without the checkpoint's ``WhitespaceSplit``, so it adds a lone "▁" (id 110) where a
  text segment ends in whitespace (end of text, before a special token). Ids must match it exactly
  on texts without such whitespace, and differ from it only by those extra 110s elsewhere.
* ``hf_ws``: the same tokenizer with the pre-tokenizer the checkpoint's ``tokenizer.json`` declares
  (this is transformers 4's ``PegasusTokenizerFast``). Ids must match it on every text.

The ``spiece.model`` path is checked on a SentencePiece model trained here against raw
``sentencepiece`` (ids + 103) and against transformers' conversion of the same file. One known
corner case is left out of the corpora: U+0085 (NEL) is whitespace to the checkpoint's
``WhitespaceSplit`` but an unknown character to SentencePiece and transformers 5.
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import sys
import unicodedata
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import pre_tokenizers

from pegasus_x.errors import TokenizerError
from pegasus_x.tokenizer import PegasusTokenizer
from conftest import assert_imports_without_torch

transformers = pytest.importorskip("transformers", reason="install the test extras: pip install -e '.[test]'")

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "pegasus-tokenizer"   # ../shared beside the repo
if not (REAL / "tokenizer.json").is_file():  # fall back to the copy shipped in the package
    REAL = Path(__file__).resolve().parents[1] / "src" / "pegasus_x" / "assets" / "pegasus-tokenizer"
SPACE = 110  # the lone "▁" piece

PROSE = [
    "To ensure a smooth flow of bank resolutions.",
    "The quick brown fox jumps over the lazy dog. It's 3:45pm, isn't it? Yes -- (probably) 100%!",
    "Prices rose 4.5% in Q3 2023; analysts at J.P. Morgan & Co. expected $1,234.56bn.",
    "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다.",
    "مرحبا بالعالم، هذه جملة عربية.",
    "Привет, мир! Это русское предложение.",
    "नमस्ते दुनिया, यह एक हिंदी वाक्य है।",
    "emoji 👍🏽 ok 🎉🎉 👨‍👩‍👧 flags 🇫🇷",
    unicodedata.normalize("NFC", "café naïve résumé Ångström Øresund"),
    unicodedata.normalize("NFD", "café naïve résumé Ångström Øresund"),
    "runs   of     spaces and\ttabs\t\tand\nnew\n\nlines\r\nand\u00a0nbsp\u3000ideographic",
    "",
    "<mask_1> To ensure a<mask_2>flow.",
    "x<pad>y</s>z<unk_5><unk><unk_102><unk_103><mask_3>",
    "<n> literal newline piece",
    "fullwidth ＡＢＣ１２３ ligature ﬁ ½ ™ ① ㎞",
    "zero\u200bwidth\u200djoiner\u2060and soft\u00adhyphen",
    "quotes “curly” ‘single’ «guillemets» — dashes – …",
]
# Texts whose segments end in whitespace: transformers 5 inserts lone "▁" pieces here.
SPACED = [
    "  leading and trailing  ",
    "  ",
    "\n",
    "ends with a newline\n",
    "<mask_1> To ensure a <mask_2> flow of bank resolutions.",
    "Let's see which <unk> is the better <unk_11> one <mask_1> It seems like this <mask_2> was important </s> <pad>",
]


def _random_texts(count: int, seed: int, specials: bool) -> list[str]:
    """Deterministic mixes of corpus fragments, odd whitespace and (maybe) special tokens."""
    rng = random.Random(seed)
    pieces = " ".join(PROSE).split(" ")
    if specials:
        pieces += ["<mask_1>", "<mask_2>", "</s>", "<pad>", "<unk>", "<unk_17>", "<n>"]
    glue = [" ", "  ", "\t", "\n", "", " \n ", "\u2028", "\u3000"]
    texts = ["".join(rng.choice(pieces) + rng.choice(glue) for _ in range(rng.randint(1, 40))) for _ in range(count)]
    return texts if specials else [t.strip() for t in texts]


RANDOM = _random_texts(120, seed=0, specials=True) + _random_texts(60, seed=1, specials=False)
CORPUS = PROSE + SPACED + RANDOM
_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in ["<pad>", "</s>", "<mask_1>", "<mask_2>", "<unk>"]
                                  + [f"<unk_{i}>" for i in range(102, 1, -1)]))


def _ends_in_space(text: str, normalizer) -> bool:
    """Whether a special-token-free segment of ``text`` ends in whitespace once normalized."""
    return any(normalizer.normalize_str(seg)[-1:].isspace() for seg in _SPECIAL_RE.split(text))


def _long_document(chars: int = 200_000, spaced: bool = True) -> str:
    rng = random.Random(1)
    parts, size = [], 0
    while size < chars:
        parts.append(rng.choice(PROSE + SPACED if spaced else [t for t in PROSE if not _SPECIAL_RE.search(t)]))
        size += len(parts[-1]) + 1
    text = "\n".join(parts)[:chars]
    return text if spaced else text.strip()


def _as_lists(batch) -> dict:
    return {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in batch.items()}


def _extra_spaces_only(hf_ids: list[int], ours: list[int]) -> bool:
    """True when ``hf_ids`` is ``ours`` with some lone "▁" pieces inserted."""
    j = 0
    for token in hf_ids:
        if j < len(ours) and token == ours[j]:
            j += 1
        elif token != SPACE:
            return False
    return j == len(ours)


@pytest.fixture(scope="module")
def ours() -> PegasusTokenizer:
    return PegasusTokenizer.from_pretrained(REAL)


@pytest.fixture(scope="module")
def hf():
    return transformers.AutoTokenizer.from_pretrained(str(REAL))


@pytest.fixture(scope="module")
def hf_ws(hf):
    oracle = copy.deepcopy(hf)
    oracle.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)])
    return oracle


# ---------------------------------------------------------------------- real vocabulary
def test_known_vectors(ours):
    assert ours("To ensure a smooth flow of bank resolutions.")["input_ids"] == [
        413, 615, 114, 2291, 1971, 113, 1679, 10710, 107, 1]
    assert ours.encode("<mask_1> To ensure a <mask_2> flow of bank resolutions.") == [
        2, 413, 615, 114, 3, 1971, 113, 1679, 10710, 107, 1]


def test_layout(ours):
    assert ours.vocab_size == len(ours) == 96103
    assert (ours.pad_token_id, ours.eos_token_id, ours.mask_token_sent_id, ours.mask_token_id) == (0, 1, 2, 3)
    assert ours.unk_token_id == 105 and ours.offset == 103
    assert ours.convert_ids_to_tokens([0, 1, 2, 3, 4, 104, 105, 106]) == [
        "<pad>", "</s>", "<mask_1>", "<mask_2>", "<unk_2>", "<unk_102>", "<unk>", "<n>"]
    assert ours.convert_tokens_to_ids(["</s>", "<mask_2>", "▁the", "not-a-piece"]) == [1, 3, 109, 105]
    assert ours.all_special_ids == list(range(106))
    assert ours.model_max_length == 1024  # from tokenizer_config.json
    assert PegasusTokenizer.pegasus().model_max_length == 16384


def test_special_attributes_match_transformers(ours, hf):
    assert ours.vocab_size == hf.vocab_size and len(ours) == len(hf)
    for name in ("pad_token_id", "eos_token_id", "unk_token_id", "mask_token_id"):
        assert getattr(ours, name) == getattr(hf, name), name
    assert ours.all_special_ids == sorted(hf.all_special_ids)
    assert ours.get_vocab() == hf.get_vocab()


def test_ids_equal_transformers_on_clean_text(ours, hf):
    clean = [t for t in CORPUS if not _ends_in_space(t, hf.backend_tokenizer.normalizer)]
    assert len(clean) > 60 and set(PROSE) <= set(clean)
    assert [ours.encode(t) for t in clean] == hf(clean)["input_ids"]


def test_ids_equal_checkpoint_pipeline_everywhere(ours, hf, hf_ws):
    texts = CORPUS + [_long_document()]
    mine = [ours.encode(t) for t in texts]
    assert mine == hf_ws(texts)["input_ids"]
    for text, ids, reference in zip(texts, mine, hf(texts)["input_ids"], strict=True):
        assert _extra_spaces_only(reference, ids), text[:80]


def test_transformers5_whitespace_divergence_is_documented(ours, hf):
    text = "<mask_1> To ensure a <mask_2> flow of bank resolutions."
    assert hf(text)["input_ids"] == [2, 413, 615, 114, SPACE, 3, 1971, 113, 1679, 10710, 107, 1]
    assert hf("trailing \n")["input_ids"] == ours.encode("trailing \n")[:-1] + [SPACE, 1]


_FRAGMENTS = st.sampled_from(["<mask_1>", "<mask_2>", "</s>", "<pad>", "<unk>", "<unk_9>", "<n>", " ", "\n", "\t"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.text(max_size=12), _FRAGMENTS), max_size=12).map("".join))
def test_random_unicode_matches_checkpoint_pipeline(ours, hf, hf_ws, text):
    ids = ours.encode(text)
    assert ids == hf_ws(text)["input_ids"]
    assert ours.decode(ids) == hf.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("skip", [False, True])
def test_decode_equals_transformers(ours, hf, skip):
    texts = CORPUS + [_long_document(20_000)]
    id_lists = [ours.encode(t) for t in texts] + hf(texts)["input_ids"]
    for ids in id_lists:
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert ours.batch_decode(id_lists, skip_special_tokens=skip) == hf.batch_decode(
        id_lists, skip_special_tokens=skip)
    sample = id_lists[1]
    assert ours.decode(sample, clean_up_tokenization_spaces=True) == hf.decode(
        sample, clean_up_tokenization_spaces=True)


def test_decode_accepts_tensors(ours):
    batch = ours(PROSE[:3], padding=True, return_tensors="pt")
    assert ours.batch_decode(batch["input_ids"], skip_special_tokens=True) == ours.batch_decode(
        batch["input_ids"].tolist(), skip_special_tokens=True)
    assert ours.decode(batch["input_ids"][0]) == ours.decode(batch["input_ids"][0].tolist())
    assert ours.decode(torch.tensor(1)) == "</s>"


BATCH_CALLS = [
    dict(padding="longest"),
    dict(padding=True, return_tensors="pt"),
    dict(padding="max_length", max_length=40, truncation=True),
    dict(padding="max_length"),
    dict(max_length=7),
    dict(max_length=7, truncation=True, add_special_tokens=False),
    dict(truncation=True),
    dict(max_length=9, truncation=True, padding=True, return_tensors="pt"),
    dict(max_length=1, truncation=True),
    dict(padding=True, add_special_tokens=False),
]


@pytest.mark.parametrize("kwargs", BATCH_CALLS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_batches_equal_transformers(ours, hf, hf_ws, kwargs):
    texts = PROSE[:8] + [_long_document(8_000, spaced=False)]
    assert _as_lists(ours(texts, **kwargs)) == _as_lists(hf(texts, **kwargs))
    assert _as_lists(ours(CORPUS[:60], **kwargs)) == _as_lists(hf_ws(CORPUS[:60], **kwargs))
    assert _as_lists(ours(PROSE[1], **kwargs)) == _as_lists(hf(PROSE[1], **kwargs))


@pytest.mark.parametrize("kwargs", [dict(), dict(padding=True, return_tensors="pt"),
                                    dict(max_length=6, truncation=True, padding=True)], ids=str)
def test_text_target_equals_transformers(ours, hf, kwargs):
    sources, targets = PROSE[:5], PROSE[5:10]
    mine = _as_lists(ours(sources, text_target=targets, **kwargs))
    assert mine == _as_lists(hf(sources, text_target=targets, **kwargs))
    assert set(mine) == {"input_ids", "attention_mask", "labels"}
    assert _as_lists(ours(text_target=targets, **kwargs)) == _as_lists(hf(text_target=targets, **kwargs))


def test_attribute_access_and_tensor_dtypes(ours):
    batch = ours(["a b", "c"], padding=True, return_tensors="pt")
    assert batch.input_ids.dtype == torch.long and batch.attention_mask.dtype == torch.long
    assert batch.input_ids.tolist() == [[114, 3027, 1], [2895, 1, 0]]
    assert ours("a b", return_tensors="pt").input_ids.shape == (1, 3)


# ---------------------------------------------------------------------- newline option
def test_newline_to_n_round_trip():
    tok = PegasusTokenizer.pegasus(newline_to_n=True)
    ids = tok.encode("a\nb")
    assert 106 in ids and ids[-1] == 1
    assert tok.decode(ids, skip_special_tokens=True) == "a\nb"
    text = "First paragraph here.\nSecond one.\n\nThird."
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
    assert tok.batch_decode([tok.encode(text)], skip_special_tokens=True) == [text]


def test_default_newline_is_whitespace(ours):
    assert 106 not in ours.encode("a\nb")
    assert ours.decode([114, 106, 1271]) == "a<n>b"


# ---------------------------------------------------------------------- save / load
def test_save_then_load_gives_same_ids(ours, tmp_path):
    written = ours.save_pretrained(tmp_path / "saved")
    assert sorted(Path(p).name for p in written) == ["special_tokens_map.json", "tokenizer.json",
                                                     "tokenizer_config.json"]
    assert sorted(os.listdir(tmp_path / "saved")) == sorted(Path(p).name for p in written)  # no temp files
    again = PegasusTokenizer.from_pretrained(tmp_path / "saved")
    assert [again.encode(t) for t in CORPUS] == [ours.encode(t) for t in CORPUS]
    assert again.model_max_length == ours.model_max_length
    assert json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())["offset"] == 103


def test_pegasus_assets_match_reference_folder(ours):
    shipped = PegasusTokenizer.pegasus()
    assert [shipped.encode(t) for t in CORPUS] == [ours.encode(t) for t in CORPUS]


# ---------------------------------------------------------------------- spiece.model path
SPM_WORDS = ("the quick brown fox jumps over lazy dog bank flow resolution ensure smooth summary document "
             "long model paragraph sentence article news report market price rose fell analysts said").split()


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece", reason="install the test extras: pip install -e '.[test]'")
    root = tmp_path_factory.mktemp("spm")
    rng = random.Random(0)
    syllables = ("ka ri to su ne mo la pe di ghu sta bro qui fla nk ing ed er th sh ch x z v w y j "
                 "é ü ö ß ña Мос ква го род 東 京 日 本 مر حب ا न म स्ते 0 1 2 3 4 5").split()
    words = SPM_WORDS + ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(600)]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 15))) + rng.choice(".,!?;: ")
             for _ in range(3000)]
    (root / "corpus.txt").write_text("\n".join(lines), encoding="utf-8")
    # PEGASUS layout: <pad>=0, </s>=1, <unk>=2, user-defined <n>=3, no BOS.
    spm.SentencePieceTrainer.train(
        input=str(root / "corpus.txt"), model_prefix=str(root / "m"), vocab_size=400, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, user_defined_symbols=["<n>"], hard_vocab_limit=False,
        character_coverage=1.0, minloglevel=2)
    folder = root / "tok"
    folder.mkdir()
    (folder / "spiece.model").write_bytes((root / "m.model").read_bytes())
    return folder


@pytest.fixture(scope="module")
def spm_texts():
    rng = random.Random(3)
    fragments = SPM_WORDS + ["Москва", "東京", "naïve", "café", "straße", "नमस्ते", "QQQ", "@@", "👍", "Ω", "x9"]
    texts = [" ".join(rng.choice(fragments) for _ in range(rng.randint(1, 12))) for _ in range(60)]
    texts += [t + rng.choice(["", " ", "\n", "\t "]) for t in texts[:20]]
    return texts + ["", "  ", "the\nquick\tfox", unicodedata.normalize("NFD", "café naïve")] + PROSE


def test_spm_ids_equal_sentencepiece(spm_dir, spm_texts):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_dir / "spiece.model"))
    tok = PegasusTokenizer.from_pretrained(spm_dir)
    assert tok.vocab_size == sp.get_piece_size() - 2 + 105
    plain = [t for t in spm_texts if not re.search(r"<(pad|/s|mask_\d|unk(_\d+)?)>", t)]
    for text in plain:
        assert tok.encode(text, add_special_tokens=False) == [i + 103 for i in sp.encode(text)], text
        assert tok.encode(text)[-1] == 1


def test_spm_ids_and_decode_equal_transformers(spm_dir, spm_texts):
    reference = transformers.PegasusTokenizer.from_pretrained(str(spm_dir))
    reference.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)])
    tok = PegasusTokenizer.from_pretrained(spm_dir)
    texts = spm_texts + ["a <mask_2> b </s> <pad><unk_7>", "<mask_1> the quick <mask_2> fox."]
    assert tok(texts)["input_ids"] == reference(texts)["input_ids"]
    for ids in tok(texts)["input_ids"]:
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)
    kwargs = dict(padding=True, truncation=True, max_length=6, return_tensors="pt")
    assert _as_lists(tok(texts, text_target=texts, **kwargs)) == _as_lists(reference(texts, text_target=texts,
                                                                                     **kwargs))


def test_spm_save_then_load(spm_dir, spm_texts, tmp_path):
    tok = PegasusTokenizer.from_pretrained(spm_dir, newline_to_n=True)
    written = [Path(p).name for p in tok.save_pretrained(tmp_path)]
    assert "spiece.model" in written and "tokenizer.json" not in written
    again = PegasusTokenizer.from_pretrained(tmp_path, newline_to_n=True)
    assert [again.encode(t) for t in spm_texts] == [tok.encode(t) for t in spm_texts]
    assert again.decode(again.encode("the\nfox"), skip_special_tokens=True) == "the\nfox"


def test_spm_wrong_layout_is_rejected(tmp_path, spm_dir):
    spm = pytest.importorskip("sentencepiece", reason="install the test extras: pip install -e '.[test]'")
    spm.SentencePieceTrainer.train(input=str(spm_dir.parent / "corpus.txt"), model_prefix=str(tmp_path / "d"),
                                   vocab_size=200, hard_vocab_limit=False, minloglevel=2)  # unk=0, bos=1, eos=2
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "spiece.model").write_bytes((tmp_path / "d.model").read_bytes())
    with pytest.raises(TokenizerError, match="must have <pad> = 0"):
        PegasusTokenizer.from_pretrained(tmp_path / "tok")


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("value, phrase", [
    (None, "expected text or text_target"),
    (b"bytes", "decode bytes first"),
    (["ok", 3], r"text\[1\] is int"),
    (("ok", None), r"text\[1\] is NoneType"),
    (42, "must be a str or a list of str"),
])
def test_bad_text_raises(ours, value, phrase):
    with pytest.raises(TokenizerError, match=phrase):
        ours(value)


def test_bad_options_raise(ours):
    with pytest.raises(TokenizerError, match="expects a str"):
        ours.encode(None)
    with pytest.raises(TokenizerError, match="padding must be"):
        ours("a", padding="sideways")
    with pytest.raises(TokenizerError, match="pass padding=True"):
        ours(["a", "a b c"], return_tensors="pt")
    with pytest.raises(TokenizerError, match="return_tensors must be"):
        ours(["a"], return_tensors="tf")
    with pytest.raises(TokenizerError, match="max_length must be a positive int"):
        ours("a", max_length=0, truncation=True)
    with pytest.raises(TokenizerError, match="text and text_target must match"):
        ours(["a", "b"], text_target=["c"])
    with pytest.raises(TokenizerError, match="use batch_decode"):
        ours.decode([[1, 2]])
    with pytest.raises(TokenizerError, match="non-negative int ids"):
        ours.decode([1, "x"])
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        ours.convert_ids_to_tokens(10**6)
    assert isinstance(TokenizerError("x"), ValueError)


def test_bad_folders_raise(tmp_path, monkeypatch):
    with pytest.raises(TokenizerError, match="does not exist"):
        PegasusTokenizer.from_pretrained(tmp_path / "missing" / "folder")
    with pytest.raises(TokenizerError, match="no tokenizer.json or spiece.model"):
        PegasusTokenizer.from_pretrained(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(TokenizerError, match="is a file"):
        PegasusTokenizer.from_pretrained(tmp_path / "file.txt")
    with pytest.raises(TokenizerError, match="expected a folder path"):
        PegasusTokenizer.from_pretrained(None)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot load"):
        PegasusTokenizer.from_pretrained(tmp_path)


def test_hub_id_errors_say_how_to_get_files(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    with pytest.raises(TokenizerError, match="huggingface_hub is not installed.*pass that folder's path"):
        PegasusTokenizer.from_pretrained("some-org/some-model")


def test_hub_download_failure_is_a_tokenizer_error(monkeypatch):
    import huggingface_hub as hub

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(hub, "snapshot_download", offline)
    with pytest.raises(TokenizerError, match="could not download.*network is unreachable"):
        PegasusTokenizer.from_pretrained("some-org/some-model")


def test_tokenizer_imports_without_torch():
    assert_imports_without_torch("pegasus_x.tokenizer")
