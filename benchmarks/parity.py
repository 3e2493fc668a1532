"""Max-abs-diff table of our model vs the reference (transformers pegasus_x) on identical random weights.

    python benchmarks/parity.py

Cases: lengths 1, 7, K-1, K, K+1, 3.5K for block size K=8; staggering on/off; 1 and 16 global tokens;
relu and gelu; a batch of 3 right-padded inputs; both attention back-ends.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from twin import random_batch, reference_twin  # benchmarks/twin.py (the script's folder)

K = 8
CASES = {
    "stagger, relu, 5 globals": {},
    "no stagger, gelu, 16 globals": dict(stagger_local_blocks=False, activation_function="gelu", num_global_tokens=16),
    "stagger, gelu, 1 global": dict(num_global_tokens=1, activation_function="gelu"),
}


def main() -> None:
    torch.set_num_threads(2)
    print(f"{'case':32s} {'input':>10s} {'backend':>7s} {'encoder max|Δ|':>15s} {'logits max|Δ|':>14s}")
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in CASES.items():
            ref, ours, _ = reference_twin(Path(tmp) / name.replace(" ", "").replace(",", "_"), **overrides)
            inputs = [[n] for n in (1, 7, K - 1, K, K + 1, int(3.5 * K))] + [[28, 5, 9]]
            for lengths in inputs:
                ids, mask, dec = random_batch(lengths, ref.config.vocab_size, seed=sum(lengths))
                with torch.no_grad():
                    r = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
                    for backend in ("sdpa", "eager"):
                        ours.set_attention_backend(backend)
                        o = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
                        enc = (o.encoder_last_hidden_state - r.encoder_last_hidden_state).abs().max().item()
                        log = (o.logits - r.logits).abs().max().item()
                        worst = max(worst, enc, log)
                        label = "x".join(map(str, lengths)) if len(lengths) > 1 else str(lengths[0])
                        print(f"{name:32s} {label:>10s} {backend:>7s} {enc:15.2e} {log:14.2e}")
    print(f"worst max|Δ| = {worst:.2e} (bar: 1e-4)")


if __name__ == "__main__":
    main()
