#!/usr/bin/env bash
# The demo model: a small PEGASUS-X trained from scratch on Debian manual pages (page text -> NAME line).
# These are exactly the commands that produced src/pegasus_x/assets/demo (numbers in README.md here).
#
#   apt-get install -y man-db manpages manpages-dev
#   WORK=/tmp/pegasus-x-manpages bash examples/manpages/train.sh
#
# Everything runs on a CPU (one thread per process: on a busy 2-core machine more threads only spin).
set -euo pipefail
WORK=${WORK:-/tmp/pegasus-x-manpages}
PYTHON=${PYTHON:-python}
STEPS_A=${STEPS_A:-900}
STEPS_B=${STEPS_B:-400}
HERE=$(cd "$(dirname "$0")" && pwd)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# 1. Corpus: every installed English man page except the machine-generated gcloud ones.
[ -f "$WORK/train.jsonl" ] || $PYTHON "$HERE/prepare.py" --out "$WORK"

# 2. An 8k SentencePiece unigram vocabulary in the PEGASUS layout, trained on the training split.
[ -f "$WORK/tokenizer/spiece.model" ] || $PYTHON "$HERE/train_tokenizer.py" --data "$WORK/train.jsonl" \
    --out "$WORK/tokenizer" --vocab-size 8000

# 3. Self-supervised "section lead" pairs from the training pages (teaches reading and copying).
for split in train validation; do
    [ -f "$WORK/pseudo-$split.jsonl" ] || $PYTHON "$HERE/pseudo_pairs.py" --data "$WORK/$split.jsonl" \
        --out "$WORK/pseudo-$split.jsonl"
done

# 4. Stage A, from random init: d_model 192, 3+3 layers, 4 heads, ffn 768, block 128, 16 global tokens.
$PYTHON -m pegasus_x train --model tiny --tokenizer "$WORK/tokenizer" \
    --config-override d_model=192 --config-override encoder_layers=3 --config-override decoder_layers=3 \
    --config-override encoder_attention_heads=4 --config-override decoder_attention_heads=4 \
    --config-override encoder_ffn_dim=768 --config-override decoder_ffn_dim=768 \
    --config-override block_size=128 --config-override num_global_tokens=16 --config-override dropout=0.1 \
    --train "$WORK/pseudo-train.jsonl" --validation "$WORK/pseudo-validation.jsonl" --output-dir "$WORK/stageA" \
    --max-source-length 256 --max-target-length 48 --max-tokens-per-batch 8192 --max-steps "$STEPS_A" \
    --optimizer adamw --learning-rate 1e-3 --weight-decay 0.01 --schedule constant --warmup-steps 100 \
    --label-smoothing 0.1 --clip 1.0 --seed 0 --eval-every 100 --keep-best 1 --metric loss --log-every 10

# 5. Stage B: the real task (page -> NAME line), from the stage-A model.
$PYTHON -m pegasus_x train --model "$WORK/stageA" \
    --train "$WORK/train.jsonl" --validation "$WORK/validation.jsonl" --output-dir "$WORK/stageB" \
    --max-source-length 256 --max-target-length 48 --max-tokens-per-batch 8192 --max-steps "$STEPS_B" \
    --optimizer adamw --learning-rate 5e-4 --weight-decay 0.01 --schedule cosine --warmup-steps 20 \
    --label-smoothing 0.1 --clip 1.0 --seed 1 --eval-every 50 --keep-best 1 --metric loss --log-every 10 \
    --save-dtype bf16 --generation-config num_beams=4 --generation-config max_new_tokens=48 \
    --generation-config length_penalty=0.8 --generation-config no_repeat_ngram_size=3

# 6. Held-out scores: the model, then the lead baselines.
$PYTHON -m pegasus_x evaluate --model "$WORK/stageB" --data "$WORK/test.jsonl" --max-source-length 256 \
    --output-dir "$WORK/eval-test"
$PYTHON "$HERE/baseline.py" --data "$WORK/test.jsonl"

# 7. Package: the stage-B model with its tokenizer as tokenizer.json (no sentencepiece needed to load it).
DEMO=${DEMO:-$HERE/../../src/pegasus_x/assets/demo}
mkdir -p "$DEMO"
for f in config.json model.safetensors generation_config.json tokenizer_config.json special_tokens_map.json; do
    install -m 644 "$WORK/stageB/$f" "$DEMO/$f"
done
$PYTHON -c "import sys; from pegasus_x.tokenizer import PegasusTokenizer as T; \
open(sys.argv[2], 'w', encoding='utf-8').write(T.from_pretrained(sys.argv[1]).backend_tokenizer.to_str())" \
    "$WORK/stageB" "$DEMO/tokenizer.json"
