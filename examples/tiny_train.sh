#!/usr/bin/env bash
# The smallest real end-to-end run (what `make demo` runs until the full vision-language demo lands):
#   1. a random tiny LLaMA (2 layers, hidden 64, vocab 64), written as a Hugging Face directory
#   2. pretraining from scratch on toy arithmetic progressions: every tensor trained (--train-tensors all)
#   3. merge into a new base model directory
#   4. fine-tuning on unseen strides twice from that base: dense LoRA and TS-LoRA (gated)
#   5. exact-match evaluation through greedy generation, and a summary table
# Usage: examples/tiny_train.sh [path/to/tspeft] [run dir]     (exits non-zero if any stage fails)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
TSPEFT=${1:-build/tspeft}
RUN=${2:-runs/tiny}
PY=/usr/bin/python3
THREADS=${THREADS:-2}
mkdir -p "$RUN"
echo "== 1/5 random base model and toy data in $RUN"
$PY "$here/make_random_llama.py" "$RUN/base0" --hidden 128 --layers 3 --heads 4 --kv-heads 2 \
    --intermediate 344 --vocab 64 --max-pos 64 --seed 0
$PY "$here/toy_tasks.py" make "$RUN/data" --seed 0
echo "== 2/5 pretraining every tensor from scratch"
"$TSPEFT" train --model "$RUN/base0" --data "$RUN/data/pretrain.jsonl" --adapter-type none --train-tensors all \
    --steps 800 --batch-size 16 --lr 2e-3 --lr-scheduler cosine --warmup-steps 20 --shuffle \
    --out "$RUN/pretrained" --log-every 50 --threads "$THREADS"
echo "== 3/5 merging into $RUN/base"
"$TSPEFT" merge --model "$RUN/base0" --adapter "$RUN/pretrained" --out "$RUN/base"
for gate in off on; do
    name=$([ $gate = on ] && echo ts-lora || echo lora)
    echo "== 4/5 fine-tuning $name (gate $gate)"
    "$TSPEFT" train --model "$RUN/base" --data "$RUN/data/finetune.jsonl" --target-modules all --r 8 --alpha 16 \
        --gate $gate --ts-lambda 0.3 --ts-warmup-steps 50 --steps 300 --batch-size 16 --lr 2e-3 --shuffle --seed 1 \
        --out "$RUN/$name" --log-every 50 --threads "$THREADS" 2> >(tee "$RUN/$name.log" >&2)
done
echo "== 5/5 evaluation (exact match of 6 generated numbers on 40 held-out prompts)"
$PY "$here/toy_tasks.py" eval --tspeft "$TSPEFT" --model "$RUN/base" --data "$RUN/data/eval.jsonl" > "$RUN/base.eval.json"
for name in lora ts-lora; do
    $PY "$here/toy_tasks.py" eval --tspeft "$TSPEFT" --model "$RUN/base" --adapter "$RUN/$name" \
        --data "$RUN/data/eval.jsonl" > "$RUN/$name.eval.json"
done
$PY - "$RUN" <<'PYEOF'
import json, re, sys
run = sys.argv[1]
def em(n): return json.load(open("%s/%s.eval.json" % (run, n)))["exact_match"]
print("\n%-9s %12s %10s %14s %10s" % ("method", "exact match", "last loss", "updates kept", "tokens/s"))
print("%-9s %12.3f %10s %14s %10s" % ("base", em("base"), "-", "-", "-"))
for n in ("lora", "ts-lora"):
    s = json.load(open("%s/%s/train_summary.json" % (run, n)))
    keeps = re.findall(r"keep ([0-9.]+)", open("%s/%s.log" % (run, n)).read())
    print("%-9s %12.3f %10.4f %14s %10.0f" % (n, em(n), s["last_step_loss"], keeps[-1] if keeps else "-",
                                            s["tokens_per_second"]))
print("\nadapters: %s/lora, %s/ts-lora (PEFT layout; TS-LoRA thresholds in ts_tau tensors)" % (run, run))
PYEOF
