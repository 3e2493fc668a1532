"""Training memory per decoder layer: what autograd keeps for backward, with gradient checkpointing on.

    python benchmarks/train_memory.py                                      # 8,192 source tokens, 2 vs 10 layers
    python benchmarks/train_memory.py --source-length 16384 --decoder-layers 2 6 12

pegasus-x-base widths (d_model 768, 12 heads, FFN 3072), random weights, fp32, batch 1, training mode with
dropout off. One forward pass per decoder depth; counted are the bytes of the distinct non-parameter storages
saved for backward (``torch.autograd.graph.saved_tensors_hooks``). Inside a checkpointed layer torch's own hooks
take over, so the count is what lives across layers. Deterministic: no timing, no RSS. The encoder has
``--encoder-layers`` layers (default 1): it costs the same at every decoder depth, so the growth per decoder layer
does not depend on it. Printed beside the growth: the size of one layer's cross-attention keys + values
(2 · S · d_model · 4 bytes), which each decoder layer kept before they were projected inside the layers (#16).
"""

from __future__ import annotations

import argparse

import torch

from pegasus_x import PegasusXConfig, PegasusXForConditionalGeneration


def saved_bytes(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps for backward after one forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()    # saved tensors stay alive: addresses are not reused
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=labels).loss
    del loss
    return sum(kept.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source-length", type=int, default=8192)
    p.add_argument("--target-length", type=int, default=64)
    p.add_argument("--decoder-layers", type=int, nargs="+", default=[2, 10])
    p.add_argument("--encoder-layers", type=int, default=1)
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 1000, (1, args.source_length), generator=g)
    labels = torch.randint(2, 1000, (1, args.target_length), generator=g)
    results = {}
    for layers in args.decoder_layers:
        cfg = PegasusXConfig.base(encoder_layers=args.encoder_layers, decoder_layers=layers, dropout=0.0,
                                  attention_dropout=0.0, activation_dropout=0.0)
        model = PegasusXForConditionalGeneration(cfg).train()
        model.gradient_checkpointing_enable()
        results[layers] = saved_bytes(model, ids, labels)
        print(f"decoder layers {layers:3d}: {results[layers] / 2**20:9.1f} MiB saved for backward", flush=True)
    lo, hi = min(results), max(results)
    if hi > lo:
        d_model = PegasusXConfig.base().d_model
        per_layer = (results[hi] - results[lo]) / (hi - lo)
        cross = 2 * args.source_length * d_model * 4
        print(f"growth per decoder layer: {per_layer / 2**20:.2f} MiB "
              f"(one layer's cross keys + values: {cross / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
