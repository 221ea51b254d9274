#!/usr/bin/env bash
# Does the choice of problems decide whether ITT passes dense within the demo's 300 steps?
# (issue 24 item 6, "which problems"; docs/EXPERIMENTS.md, "The demo's problems".) Writes two
# corpora from the demo's own data, each line of the built-in corpus kept or dropped by its
# kind, then trains the demo's two models (tiny-itt4 and dense tiny, the demo's settings) on
# both with `itt experiment table1`, two seeds, two runs at a time with one thread each:
#   a: reversal, bracket closing, sorting and filler (the kinds ITT x4 leads on at 1500 steps)
#   c: the same and counting (every kind but the multi-digit arithmetic no model here learns)
# Usage: scripts/demo_mix_probe.sh [OUT]   (default /tmp/itt-demo-mix; ~8 min on 2 cores)
source "$(dirname "$0")/demo_probe_setup.sh" /tmp/itt-demo-mix "$@"
python3 - "$OUT" <<'PY'
import array, json, re, sys
out = sys.argv[1]
data = f"{out}/demo/data"
# Char tokenizer: id 0 <|eot|> (ends each document), 1 <|unk|>, then `chars` from id 2.
chars = json.load(open(f"{data}/tokenizer.json"))["chars"]
def documents(path):
    ids = array.array("H", open(path, "rb").read()[128:])  # 128-byte shard header, u16 tokens
    doc = []
    for t in ids:
        if t == 0:
            yield "".join(doc)
            doc = []
        else:
            doc.append(chars[t - 2])
def kind(line):
    if re.match(r"^\d+\+\d+=", line): return "add"
    if re.match(r"^\d+-\d+=", line): return "sub"
    for k in ("close", "sort", "rev", "count"):
        if line.startswith(k + " "): return k
    return "filler"
docs = [d for split in ("train", "val") for d in documents(f"{data}/{split}.bin")]
for name, keep in {"a": {"rev", "close", "sort", "filler"}, "c": {"rev", "close", "sort", "count", "filler"}}.items():
    with open(f"{out}/{name}.jsonl", "w") as f:
        for d in docs:
            lines = [l for l in d.split("\n") if l and kind(l) in keep]
            f.write(json.dumps({"text": "\n".join(lines) + "\n"}) + "\n")
PY
"$ITT" experiment table1 --data "$OUT/a.jsonl,$OUT/c.jsonl" --variants dense,itt4 --seeds 2 --steps 300 \
    --jobs 2 --problems 0 --out "$OUT/runs" --quiet
