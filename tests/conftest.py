"""Shared fixtures: tiny configs and a reference (transformers) model twin on identical random weights."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

SRC = Path(__file__).resolve().parents[1] / "src" / "pegasus_x"

TINY = dict(vocab_size=96, d_model=32, encoder_layers=3, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, num_global_tokens=5, block_size=8,
            dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, init_std=0.2, activation_function="relu")


def tiny_kwargs(**overrides):
    """Config keyword arguments of a tiny model (block 8, staggered, 3 encoder layers) with overrides."""
    return {**TINY, **overrides}


def reference_twin(tmp_path, seed: int = 0, **overrides):
    """A random transformers PegasusXForConditionalGeneration and ours loaded from its save_pretrained folder."""
    from transformers import PegasusXConfig as RefConfig
    from transformers import PegasusXForConditionalGeneration as RefModel

    from pegasus_x import PegasusXForConditionalGeneration

    torch.manual_seed(seed)
    ref = RefModel(RefConfig(**tiny_kwargs(**overrides))).eval()
    folder = tmp_path / f"ref-{seed}"
    ref.save_pretrained(folder)
    ours = PegasusXForConditionalGeneration.from_pretrained(folder)
    return ref, ours, folder


def random_batch(lengths, vocab: int, seed: int = 0, dec_len: int = 6):
    """Right-padded ids/mask for the given lengths and decoder inputs starting with the start token 0."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(2, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = 0
    dec = torch.randint(2, vocab, (len(lengths), dec_len), generator=g)
    dec[:, 0] = 0
    return ids, mask, dec


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
