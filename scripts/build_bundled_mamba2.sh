#!/usr/bin/env bash
# Reproduce the bundled retrieval model (statex_serve/bundled/statex-mamba2-tiny)
# with our own tools, on a CPU: a byte-level Mamba2 pre-trained from scratch
# to retrieve a passkey (short documents first, then up to 1.5K tokens),
# StateX-expanded (d_state 32 -> 128 in layer 1), post-trained on text and
# passkeys together, evaluated, and copied into the package.
#
#   OMP_NUM_THREADS=1 scripts/build_bundled_mamba2.sh [RUN_DIR]   # ~90 min on one CPU core
#
# Why this order (docs/bundled-model.md): retrieval appears late and only with
# recall-dense data, so pre-training is passkey documents alone, on every token
# (loss=all: the needle repeats the key, which teaches copying first); a short
# stage learns the mechanism, a long one makes it hold over 1.5K tokens of
# filler. Text comes in after the expansion, mixed 1:1 with passkeys so the
# post-training teaches language without losing retrieval.
# Step counts are the committed model's (its statex.json records each stage).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/bundled-mamba2}
PY=${PY:-.venv/bin/python}
TRAIN="$PY -m training.cli"
DEVICE=${DEVICE:-cpu}
COPY_STEPS=${COPY_STEPS:-600} LENGTH_STEPS=${LENGTH_STEPS:-716}
POST1_STEPS=${POST1_STEPS:-1084} POST2_STEPS=${POST2_STEPS:-895} POST3_STEPS=${POST3_STEPS:-758}
EVAL_SAMPLES=${EVAL_SAMPLES:-20}
DEST=${DEST:-statex_serve/bundled/statex-mamba2-tiny}
mkdir -p "$RUN"
COMMON=(--device "$DEVICE" --overwrite --no-progress --save-every 100)

$PY scripts/bundled_corpus.py --out "$RUN/corpus.jsonl"
$PY -m training.init_model --family mamba2 --hidden-size 128 --layers 2 --state-size 32 \
    --out "$RUN/init" --overwrite
# 1. copying: short passkey documents (64-200 tokens)
$TRAIN train --model "$RUN/init" --data "passkey?min_len=64&max_len=200&loss=all" --out "$RUN/copy" \
    --seq-len 256 --batch-size 16 --max-steps "$COPY_STEPS" --lr 3e-3 --warmup-steps 30 "${COMMON[@]}"
# 2. length: passkeys hidden in 200-1500 tokens of filler
$TRAIN train --model "$RUN/copy/model" --data "passkey?min_len=200&max_len=1500&loss=all" --out "$RUN/length" \
    --seq-len 1536 --batch-size 4 --max-steps "$LENGTH_STEPS" --lr 1e-3 --warmup-steps 20 "${COMMON[@]}"
# 3. StateX: layer 1's d_state 32 -> 128 (fresh B/C rows, as the reference code)
$TRAIN expand --base "$RUN/length/model" --layers 1 --state-size 128 --out "$RUN/expanded" --overwrite
# 4. post-training: text and passkeys 1:1, then passkey-heavier at a lower rate
$TRAIN train --model "$RUN/expanded" --data "jsonl:$RUN/corpus.jsonl?split=train@1" \
    --data "passkey?min_len=64&max_len=1500&loss=all@1" --out "$RUN/post1" \
    --seq-len 1536 --batch-size 4 --max-steps "$POST1_STEPS" --lr 2e-3 --warmup-steps 20 "${COMMON[@]}"
$TRAIN train --model "$RUN/post1/model" --data "jsonl:$RUN/corpus.jsonl?split=train@1" \
    --data "passkey?min_len=200&max_len=1500&loss=all@2" --out "$RUN/post2" \
    --seq-len 1536 --batch-size 4 --max-steps "$POST2_STEPS" --lr 1e-3 --warmup-steps 20 "${COMMON[@]}"
$TRAIN train --model "$RUN/post2/model" --data "jsonl:$RUN/corpus.jsonl?split=train@1" \
    --data "passkey?min_len=200&max_len=1500&loss=all@4" --out "$RUN/statex" \
    --seq-len 1536 --batch-size 4 --max-steps "$POST3_STEPS" --lr 1e-3 --warmup-steps 10 "${COMMON[@]}"
$TRAIN eval --model "$RUN/statex/model" --out "$RUN/eval" --tasks passkey,niah \
    --lengths ${EVAL_LENGTHS:-256,512,1024,2048} --samples "$EVAL_SAMPLES" \
    --heldout "jsonl:$RUN/corpus.jsonl?split=heldout" --device "$DEVICE" --overwrite --label statex-mamba2-tiny

rm -rf "$DEST"
mkdir -p "$DEST"
cp "$RUN/statex/model/"{config.json,model.safetensors,tokenizer.json,tokenizer_config.json,special_tokens_map.json,statex.json} "$DEST/"
cp "$RUN/eval/eval.json" "$DEST/eval.json"
echo "bundled model -> $DEST"
