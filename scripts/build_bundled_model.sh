#!/usr/bin/env bash
# Reproduce the bundled model (statex_serve/bundled/statex-gla-tiny) with our own
# tools: a small byte-level GLA pre-trained from scratch on offline text plus
# passkey retrieval, StateX-expanded (heads merged in every third layer),
# post-trained at longer context, evaluated, and copied into the package.
#
#   scripts/build_bundled_model.sh [RUN_DIR]        # GPU: a few minutes; CPU: hours
#
# Sizes and budgets come from the environment (defaults: the committed model):
#   HIDDEN=256 LAYERS=6 HEADS=4 PRE_STEPS=1500 POST_STEPS=600 ...
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/bundled}
PY=${PY:-.venv/bin/python}
TRAIN="$PY -m training.cli"
HIDDEN=${HIDDEN:-256} LAYERS=${LAYERS:-6} HEADS=${HEADS:-4} EVERY=${EVERY:-3}
PRE_STEPS=${PRE_STEPS:-1500} PRE_LEN=${PRE_LEN:-1024} PRE_BATCH=${PRE_BATCH:-32}
POST_STEPS=${POST_STEPS:-600} POST_LEN=${POST_LEN:-2048} POST_BATCH=${POST_BATCH:-16}
LR=${LR:-2e-3} DEVICE=${DEVICE:-auto} EVAL_SAMPLES=${EVAL_SAMPLES:-20}
# optional wall-clock caps (seconds) that shrink the step counts to fit (CPU runs)
PRE_BUDGET=${PRE_BUDGET:+--time-budget-s $PRE_BUDGET} POST_BUDGET=${POST_BUDGET:+--time-budget-s $POST_BUDGET}
DEST=${DEST:-statex_serve/bundled/statex-gla-tiny}
mkdir -p "$RUN"

$PY scripts/bundled_corpus.py --out "$RUN/corpus.jsonl"
# text for language, passkey documents for retrieval (loss on the answer only)
DATA=(--data "jsonl:$RUN/corpus.jsonl?split=train@3" --data "passkey?min_len=256&max_len=$PRE_LEN@1")
POST_DATA=(--data "jsonl:$RUN/corpus.jsonl?split=train@3" --data "passkey?min_len=512&max_len=$POST_LEN@1")

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
$TRAIN eval --model "$RUN/statex/model" --out "$RUN/eval" --tasks passkey,niah --lengths 512,1024,2048,4096 \
    --samples "$EVAL_SAMPLES" --heldout "jsonl:$RUN/corpus.jsonl?split=heldout" --device "$DEVICE" --overwrite \
    --label statex-gla-tiny

rm -rf "$DEST"
mkdir -p "$DEST"
cp "$RUN/statex/model/"{config.json,model.safetensors,tokenizer.json,tokenizer_config.json,special_tokens_map.json,statex.json} "$DEST/"
cp "$RUN/eval/eval.json" "$DEST/eval.json"
echo "bundled model -> $DEST"
