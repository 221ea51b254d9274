#!/usr/bin/env bash
# Retrofit experiments of the import work (issue 6): ITT retrofitted onto a pretrained dense
# model vs fine-tuning the dense model with the same budget (steps, tokens, learning rate).
#
#   scripts/retrofit_experiment.sh tiny      # a tiny char model pretrained here (~1 h on 2 busy cores)
#   scripts/retrofit_experiment.sh smollm2   # SmolLM2-135M-Instruct from its GGUF (~2 h on 2 busy cores)
#
# Each run writes RUN/retrofit.json (validation losses: pretrained, retrofit before training,
# after fine-tuning) and metrics.jsonl; `summary` prints them as one table.
set -euo pipefail
cd "$(dirname "$0")/.."
ITT=./target/release/itt
SHAKESPEARE=.cache/itt/text/tiny-shakespeare.txt
OUT=${OUT:-runs/retrofit}

summary() {
  python3 - "$OUT" <<'PY'
import json, pathlib, sys
rows = sorted(pathlib.Path(sys.argv[1]).glob("*/retrofit.json"))
print(f"{'run':28} {'trained':8} {'steps':>5} {'pretrained':>10} {'retrofit':>9} {'final':>8} {'tok/s':>7}")
for p in rows:
    r = json.loads(p.read_text())
    print(f"{p.parent.name:28} {r['trainable']:8} {r['summary']['steps']:5d} {r['val_loss_pretrained']:10.4f} "
          f"{r['val_loss_retrofit']:9.4f} {r['val_loss_final']:8.4f} {r['summary']['tokens_per_s']:7.0f}")
PY
}

tiny() {
  # Pretrain a dense tiny model (char tokenizer) on tiny shakespeare, then fine-tune 300 more
  # steps of 16 x 128 tokens on the same data split, four ways.
  [ -e runs/tiny-dense/latest ] || $ITT train --preset tiny --data $SHAKESPEARE --tokenizer char --steps 800 \
      --out runs/tiny-dense --quiet
  local common=(--from runs/tiny-dense --data runs/tiny-dense/data --max-steps 300 --batch-size 16 --seq-len 128
                --lr 1e-3 --warmup 10 --eval-interval 100 --eval-batches 16 --quiet)
  $ITT retrofit "${common[@]}" --steps 1 --train all --out $OUT/tiny-dense-all
  $ITT retrofit "${common[@]}" --steps 4 --train thinking --phi-init 0.01 --out $OUT/tiny-itt4-thinking-phi0.01
  $ITT retrofit "${common[@]}" --steps 4 --train thinking --phi-init 0 --out $OUT/tiny-itt4-thinking-phi0
  $ITT retrofit "${common[@]}" --steps 4 --train all --phi-init 0.01 --out $OUT/tiny-itt4-all-phi0.01
  $ITT retrofit "${common[@]}" --steps 4 --phi-init 0.1 --max-steps 0 --out $OUT/tiny-itt4-phi0.1-untrained
}

smollm2() {
  # 40 steps of 4 x 64 tokens of tiny shakespeare (10k tokens), validation on 16 batches
  # (4096 tokens) of the held-out last 10%.
  local gguf=.cache/itt/models/SmolLM2-135M-Instruct.Q4_1.gguf
  [ -e $gguf ] || python3 scripts/fetch.py smollm2
  [ -e $SHAKESPEARE ] || python3 scripts/fetch.py tiny-shakespeare
  local common=(--from $gguf --data $SHAKESPEARE --batch-size 4 --seq-len 64 --eval-batches 16 --eval-interval 20
                --warmup 4 --quiet)
  $ITT retrofit "${common[@]}" --steps 4 --phi-init 0 --max-steps 0 --out $OUT/smollm2-itt4-phi0-untrained
  $ITT retrofit "${common[@]}" --steps 4 --phi-init 0.1 --max-steps 0 --out $OUT/smollm2-itt4-phi0.1-untrained
  $ITT retrofit "${common[@]}" --steps 1 --train all --lr 1e-4 --max-steps 40 --out $OUT/smollm2-dense-all
  $ITT retrofit "${common[@]}" --steps 4 --train thinking --phi-init 0.01 --lr 1e-3 --max-steps 40 \
      --out $OUT/smollm2-itt4-thinking-phi0.01
  $ITT retrofit "${common[@]}" --steps 4 --train all --phi-init 0.01 --lr 1e-4 --max-steps 40 \
      --out $OUT/smollm2-itt4-all-phi0.01
}

case "${1:-}" in
  tiny) tiny; summary ;;
  smollm2) smollm2; summary ;;
  summary) summary ;;
  *) echo "usage: $0 tiny|smollm2|summary" >&2; exit 2 ;;
esac
