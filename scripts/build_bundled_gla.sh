#!/usr/bin/env bash
# Reproduce the bundled model (statex_serve/bundled/statex-gla-tiny) with our own
# tools: a small byte-level GLA pre-trained from scratch on offline text plus
# passkey retrieval, StateX-expanded (heads merged in every third layer),
# post-trained at longer context, evaluated, and copied into the package.
#
#   scripts/build_bundled_gla.sh [RUN_DIR]        # GPU: a few minutes; CPU: hours
#
# Sizes and budgets come from the environment (defaults: the committed model):
#   HIDDEN=256 LAYERS=6 HEADS=4 PRE_STEPS=1500 POST_STEPS=600 ...
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/bundled}
PY=${PY:-.venv/bin/python}
TRAIN="$PY -m training.cli"
HIDDEN=${HIDDEN:-192} LAYERS=${LAYERS:-4} HEADS=${HEADS:-4} EVERY=${EVERY:-2}
PRE_STEPS=${PRE_STEPS:-3000} PRE_LEN=${PRE_LEN:-1024} PRE_BATCH=${PRE_BATCH:-8}
POST_STEPS=${POST_STEPS:-1000} POST_LEN=${POST_LEN:-4096} POST_BATCH=${POST_BATCH:-2}
PK_PRE_MAX=${PK_PRE_MAX:-384} PK_POST_MIN=${PK_POST_MIN:-512} PK_POST_MAX=${PK_POST_MAX:-1280}
LR=${LR:-2e-3} DEVICE=${DEVICE:-auto} EVAL_SAMPLES=${EVAL_SAMPLES:-20}
# optional wall-clock caps (seconds) that shrink the step counts to fit (CPU runs)
PRE_BUDGET=${PRE_BUDGET:+--time-budget-s $PRE_BUDGET} POST_BUDGET=${POST_BUDGET:+--time-budget-s $POST_BUDGET}
DEST=${DEST:-statex_serve/bundled/statex-gla-tiny}
mkdir -p "$RUN"

$PY scripts/bundled_corpus.py --out "$RUN/corpus.jsonl"
# Text for language, passkey documents for retrieval. Passkey documents are kept
# well below the window (a document cut by a window boundary cannot be answered:
# state is not carried between windows), and trained on every token (loss=all)
# so the in-needle repetition of the key teaches copying before long-range recall.
DATA=(--data "jsonl:$RUN/corpus.jsonl?split=train@2"
      --data "passkey?min_len=64&max_len=$PK_PRE_MAX&loss=all@1")
POST_DATA=(--data "jsonl:$RUN/corpus.jsonl?split=train@1"
           --data "passkey?min_len=$PK_POST_MIN&max_len=$PK_POST_MAX&loss=all@1")

$PY -m training.init_model --family gla --hidden-size "$HIDDEN" --layers "$LAYERS" --heads "$HEADS" \
    --out "$RUN/init" --overwrite
$TRAIN train --model "$RUN/init" "${DATA[@]}" --out "$RUN/pretrain" --seq-len "$PRE_LEN" \
    --batch-size "$PRE_BATCH" --max-steps "$PRE_STEPS" --lr "$LR" --warmup-steps 100 --save-every 500 \
    --device "$DEVICE" --overwrite $PRE_BUDGET
$TRAIN expand --base "$RUN/pretrain/model" --every "$EVERY" --heads 1 --init reinit --out "$RUN/expanded" \
    --overwrite
$TRAIN train --model "$RUN/expanded" "${POST_DATA[@]}" --out "$RUN/statex" --seq-len "$POST_LEN" \
    --batch-size "$POST_BATCH" --max-steps "$POST_STEPS" --lr "$LR" --warmup-steps 50 --save-every 200 \
    --device "$DEVICE" --overwrite $POST_BUDGET
$TRAIN eval --model "$RUN/statex/model" --out "$RUN/eval" --tasks passkey,niah --lengths ${EVAL_LENGTHS:-256,512,1024,2048} \
    --samples "$EVAL_SAMPLES" --heldout "jsonl:$RUN/corpus.jsonl?split=heldout" --device "$DEVICE" --overwrite \
    --label statex-gla-tiny

rm -rf "$DEST"
mkdir -p "$DEST"
cp "$RUN/statex/model/"{config.json,model.safetensors,tokenizer.json,tokenizer_config.json,special_tokens_map.json,statex.json} "$DEST/"
cp "$RUN/eval/eval.json" "$DEST/eval.json"
echo "bundled model -> $DEST"
