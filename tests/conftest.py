"""Shared helpers: tiny configs, a reference (transformers) model twin on identical random weights, and a toy
training corpus with a small SentencePiece vocabulary in PEGASUS layout."""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch

from pegasus_x import PegasusXConfig, PegasusXForConditionalGeneration
from pegasus_x.tokenizer import PegasusTokenizer

torch.set_num_threads(min(2, os.cpu_count() or 1))

SRC = Path(__file__).resolve().parents[1] / "src" / "pegasus_x"

# The tiny shape, the reference twin and random batches have one owner, benchmarks/twin.py (benchmarks never import
# from tests/; tests may use the benchmarks' helpers).
sys.path.insert(0, str(SRC.parents[1] / "benchmarks"))
from twin import TINY, random_batch, reference_twin  # noqa: E402  (random_batch: re-exported to the tests)


# Where the native kernels must build: Linux with a C compiler (elsewhere they may, e.g. clang without OpenMP may not).
HAVE_CC = platform.system() == "Linux" and any(shutil.which(cc) for cc in ("cc", "gcc", "clang"))


@pytest.fixture
def lib():
    """The native kernels' library; the test skips where they need not build."""
    from pegasus_x import native

    if not HAVE_CC:
        pytest.skip("not Linux with a C compiler: the kernels need not build here; run on Linux with cc or gcc")
    built = native.library()
    assert built is not None, "a C compiler is here, yet the native kernels did not build"
    return built


def tiny_kwargs(**overrides):
    """Config keyword arguments of a tiny model (block 8, staggered, 3 encoder layers) with overrides."""
    return {**TINY, **overrides}



def small_model(*, seed: int = 0, dtype: torch.dtype = torch.float32, activation: str = "relu"):
    """A 3-decoder-layer model of width 64 (heads of 16): the shape the native decoder kernels are tested at."""
    torch.manual_seed(seed)
    cfg = PegasusXConfig(vocab_size=120, d_model=64, encoder_layers=1, decoder_layers=3, encoder_attention_heads=4,
                         decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96, num_global_tokens=4,
                         block_size=8, init_std=0.3, activation_function=activation)
    return PegasusXForConditionalGeneration(cfg).eval().to(dtype)


def run_steps(model, enc, keep, rows: int, tokens):
    """Decode ``tokens`` (one (rows, 1) tensor a step) over encoder states ``enc``: the stacked logits and the cache."""
    from pegasus_x.cache import new_cache
    from pegasus_x.generate import make_step

    cache = new_cache(model, enc, keep, rows, len(tokens) + 1)
    step = make_step(model, cache)
    with torch.no_grad():
        logits = [step(t) for t in tokens]
    return torch.stack(logits), cache



@pytest.fixture
def twin(tmp_path):
    return reference_twin(tmp_path)


def sources_containing(text: str) -> list[str]:
    """The package's Python files (relative to src/pegasus_x) whose text contains ``text``, sorted."""
    return sorted(str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if text in p.read_text(encoding="utf-8"))


def assert_imports_without_torch(module: str) -> None:
    """Import ``module`` in a fresh interpreter and check that torch stayed unloaded."""
    import subprocess
    import sys

    code = f"import {module}, sys; assert 'torch' not in sys.modules, 'torch was imported'"
    env = {**os.environ, "PYTHONPATH": str(SRC.parent)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, f"import {module}: {done.stderr[-2000:]}"


# ---------------------------------------------------------------------------------------------- training data
WORDS = ("the cat dog sat ran on under mat log red blue big small quick lazy fox jumps over a an and "
         "file list print copy move remove directory contents user system network time").split()


def toy_pairs(n: int, seed: int = 0, min_words: int = 5, max_words: int = 40) -> list[dict[str, str]]:
    """``n`` pairs whose target is the first words of the source (learnable, lengths varied)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
        rows.append({"source": " ".join(words), "target": " ".join(words[:rng.randint(2, 5)])})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_tokenizer(folder: Path, vocab_size: int = 120) -> Path:
    """Train a unigram SentencePiece model on the toy words with PEGASUS's special ids (pad 0, eos 1, unk 2)."""
    import io

    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    text = [" ".join(random.Random(i).choices(WORDS, k=20)) for i in range(300)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model, vocab_size=vocab_size,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    (folder / "spiece.model").write_bytes(model.getvalue())
    return folder


# ---------------------------------------------------------------------------------------------- tiny summarizer
# The checkpoint of test_cli.py and test_summarize.py: every summary is checked against ``oracle``, the model's
# own generate on one input, so those tests check the plumbing (reading, truncation, chunking, batching), not
# the model.
LIMIT = 44        # config.max_position_embeddings of the tiny model: the input limit (tokenizer says 16384)
BLOCK = 8
CHUNK = 40        # largest multiple of BLOCK within LIMIT
NEW = 6           # --max-new-tokens used throughout
SHORT = ["The quick brown fox jumps over the lazy dog near the river bank.",
         "Stock markets fell sharply on Monday after the inflation report.",
         "A new species of frog was found in the rainforest of Peru by a team of biologists."]
LONG = " ".join(f"Sentence {i} tells of rivers, mountains and the harvest of year {1900 + i}." for i in range(12))


@pytest.fixture(scope="module")
def tokenizer() -> PegasusTokenizer:
    return PegasusTokenizer.pegasus()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer) -> Path:
    """A 3M-parameter random PEGASUS-X (d_model 32, full vocabulary) with tokenizer files and the hub's
    generation_config quirk (max_length 16384). init_std 1.0 makes greedy outputs depend on the input."""
    torch.manual_seed(0)
    config = PegasusXConfig.tiny(d_model=32, encoder_attention_heads=2, decoder_attention_heads=2,
                                 encoder_ffn_dim=64, decoder_ffn_dim=64, num_global_tokens=4, block_size=BLOCK,
                                 max_position_embeddings=LIMIT, init_std=1.0)
    model = PegasusXForConditionalGeneration(config)
    model.generation_config = {"num_beams": 1, "max_length": 16384, "decoder_start_token_id": 0,
                               "eos_token_id": 1, "pad_token_id": 0}
    folder = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(checkpoint) -> PegasusXForConditionalGeneration:
    return PegasusXForConditionalGeneration.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def oracle(model, tokenizer):
    """summary(ids or text) by calling generate directly on one input, truncated to LIMIT keeping </s>."""
    def run(source: str | list[int], **options) -> str:
        ids = tokenizer.encode(source) if isinstance(source, str) else list(source)
        if len(ids) > LIMIT:
            ids = ids[:LIMIT - 1] + ids[-1:]
        options = {"max_new_tokens": NEW, **options}
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), **options)
        return tokenizer.decode(out[0], skip_special_tokens=True).strip()
    return run


def chunked_oracle(oracle, tokenizer, text: str) -> str:
    """The spec of --chunked: block-aligned chunks of CHUNK tokens (</s> included), then the joined summaries."""
    body = tokenizer.encode(text)[:-1]
    pieces = [body[i:i + CHUNK - 1] + [1] for i in range(0, len(body), CHUNK - 1)]
    assert len(pieces) >= 3 and all(len(p) == CHUNK for p in pieces[:-1])
    joined = tokenizer.encode("\n".join(oracle(p) for p in pieces))
    assert len(joined) <= LIMIT  # one round is enough for this text
    return oracle(joined)
