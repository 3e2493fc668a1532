"""Shared fixtures of tests/test_train.py: a toy corpus and a small SentencePiece vocabulary in PEGASUS layout."""

from __future__ import annotations

import json
import random
from pathlib import Path

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
