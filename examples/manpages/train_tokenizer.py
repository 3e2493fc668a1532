"""Train a SentencePiece unigram vocabulary in the PEGASUS layout on the training split.

PEGASUS ids: 0 ``<pad>``, 1 ``</s>``, 2 ``<mask_1>``, 3 ``<mask_2>``, 4..104 ``<unk_2>``..``<unk_102>``, then
SentencePiece piece k at id k + 103. The SentencePiece model is therefore trained with pad = 0, eos = 1,
unk = 2 and no BOS; ``pegasus_x.tokenizer.PegasusTokenizer.from_pretrained`` builds the offset layout from
``spiece.model`` and a ``tokenizer_config.json`` holding ``offset: 103``.

Usage::

    python examples/manpages/train_tokenizer.py --data /tmp/pegasus-x-manpages/train.jsonl \\
        --out /tmp/pegasus-x-manpages/tokenizer --vocab-size 8000
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

OFFSET = 103


def texts(path: Path):
    """Every paragraph line of every document and every summary of a JSONL file."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            yield row["target"]
            yield from (p for p in row["source"].splitlines() if p.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="training JSONL with source/target fields")
    parser.add_argument("--out", required=True, help="tokenizer folder to write")
    parser.add_argument("--vocab-size", type=int, default=8000, help="SentencePiece pieces (ids = this + 103)")
    parser.add_argument("--max-lines", type=int, default=400_000, help="lines sampled for training")
    args = parser.parse_args(argv)
    import sentencepiece as spm

    from pegasus_x.tokenizer import PegasusTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=texts(Path(args.data)), model_writer=model, vocab_size=args.vocab_size,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=0.9995,
        input_sentence_size=args.max_lines, shuffle_input_sentence=True, max_sentence_length=16384,
        num_threads=2, minloglevel=1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spiece.model").write_bytes(model.getvalue())
    (out / "tokenizer_config.json").write_text(json.dumps({"offset": OFFSET, "model_max_length": 16384}) + "\n")
    tokenizer = PegasusTokenizer.from_pretrained(out)
    tokenizer.save_pretrained(out)          # adds special_tokens_map.json, normalises the config
    sample = "list directory contents"
    print(f"{tokenizer}: {sample!r} -> {tokenizer.encode(sample)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
