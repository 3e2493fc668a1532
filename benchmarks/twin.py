"""A reference (transformers) PEGASUS-X and ours on identical random weights, for parity.py and gpu.py.

The tiny shape (block 8, staggered, 3 encoder layers) is the tests' one too: tests/conftest.py imports it from here,
since benchmarks never import from tests/.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY = dict(vocab_size=96, d_model=32, encoder_layers=3, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, num_global_tokens=5, block_size=8,
            dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, init_std=0.2, activation_function="relu")


def reference_twin(folder: Path, seed: int = 0, **overrides):
    """(reference model, our model, checkpoint folder): a random transformers model saved to ``folder / ref-SEED``
    and ours loaded from it."""
    from transformers import PegasusXConfig as RefConfig
    from transformers import PegasusXForConditionalGeneration as RefModel

    from pegasus_x import PegasusXForConditionalGeneration

    torch.manual_seed(seed)
    ref = RefModel(RefConfig(**{**TINY, **overrides})).eval()
    saved = folder / f"ref-{seed}"
    ref.save_pretrained(saved)
    return ref, PegasusXForConditionalGeneration.from_pretrained(saved), saved


def random_batch(lengths: list[int], vocab: int, seed: int = 0, dec_len: int = 6):
    """Right-padded (ids, mask) for the given lengths and decoder inputs starting with the start token 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (len(lengths), max(lengths)), generator=g)
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = 0
    dec = torch.randint(2, vocab, (len(lengths), dec_len), generator=g)
    dec[:, 0] = 0
    return ids, mask, dec
