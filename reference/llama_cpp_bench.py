#!/usr/bin/env python3
"""llama.cpp's prefill and decode speed on a GGUF file, the reference for `itt bench --gguf`
(docs/PERFORMANCE.md, "Quantized inference"). Not part of the tests.

    python3 -m venv /tmp/llcpp-venv && /tmp/llcpp-venv/bin/pip install llama-cpp-python
    /tmp/llcpp-venv/bin/python reference/llama_cpp_bench.py \
        --model .cache/itt/models/SmolLM2-135M-Instruct.Q4_1.gguf --threads 2 --new-tokens 64 --runs 5

Same protocol as `itt bench --gguf`: the same 53-token prompt (no chat template, no BOS, as
itt encodes it), batch 1, greedy, the whole prompt in one forward pass, the generation ends at
`--new-tokens` or at the end-of-sequence token; one warm-up run, then `--runs` runs, medians.
Prefill is the time to the first generated token (prompt pass + argmax); decode is tokens after
the first over the time after it. Both are wall-clock times of this Python loop (greedy argmax
with numpy over the logits, as a caller would do); llama.cpp's own counters of the same runs
(`llama_perf_context`, C only) are printed beside them.
"""

import argparse
import json
import statistics
import time

import numpy as np
from llama_cpp import Llama, llama_cpp

# Must match itt's `bench::GENERATE_PROMPT`.
PROMPT = (
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a lantern "
    "and a small notebook in which he recorded the ships that passed. One stormy night in November, "
    "he noticed a strange green light far out at sea that did not move with the waves."
)


def one_run(llm, tokens, new_tokens):
    llm.reset()
    llama_cpp.llama_perf_context_reset(llm.ctx)
    eos, n_vocab = llm.token_eos(), llm.n_vocab()
    out = []
    t0 = time.perf_counter()
    llm.eval(tokens)
    first = None
    while len(out) < new_tokens:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        nxt = int(np.argmax(logits))
        if first is None:
            first = time.perf_counter() - t0
        if nxt == eos:
            break
        out.append(nxt)
        if len(out) < new_tokens:
            llm.eval([nxt])
    total = time.perf_counter() - t0
    perf = llama_cpp.llama_perf_context(llm.ctx)
    return {
        "prefill_s": first,
        "decode_tokens_per_s": (len(out) - 1) / (total - first) if len(out) > 1 else float("nan"),
        "new_tokens": len(out),
        "ids": out,
        "c_prompt_ms": perf.t_p_eval_ms,
        "c_prompt_tokens": perf.n_p_eval,
        "c_eval_ms": perf.t_eval_ms,
        "c_eval_tokens": perf.n_eval,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    llm = Llama(
        model_path=a.model,
        n_threads=a.threads,
        n_threads_batch=a.threads,
        n_ctx=512,
        n_batch=512,
        verbose=False,
    )
    tokens = llm.tokenize(a.prompt.encode(), add_bos=False, special=False)
    runs = [one_run(llm, tokens, a.new_tokens) for _ in range(a.runs + 1)][1:]
    med = lambda k: statistics.median(r[k] for r in runs)
    c_prefill = statistics.median(r["c_prompt_ms"] / 1e3 for r in runs)
    c_decode = statistics.median(r["c_eval_tokens"] / (r["c_eval_ms"] / 1e3) for r in runs)
    res = {
        "llama_cpp_python": __import__("llama_cpp").__version__,
        "model": a.model,
        "threads": a.threads,
        "prompt_tokens": len(tokens),
        "new_tokens": runs[-1]["new_tokens"],
        "prefill_s_median": med("prefill_s"),
        "prefill_tokens_per_s": len(tokens) / med("prefill_s"),
        "decode_tokens_per_s": med("decode_tokens_per_s"),
        "decode_tokens_per_s_runs": [round(r["decode_tokens_per_s"], 1) for r in runs],
        "c_prefill_s_median": c_prefill,
        "c_decode_tokens_per_s": c_decode,
        "text": llm.detokenize(runs[-1]["ids"]).decode("utf-8", "replace"),
    }
    if a.json:
        print(json.dumps(res))
        return
    print(
        f"llama.cpp (llama-cpp-python {res['llama_cpp_python']}) | {a.threads} threads\n"
        f"prefill {len(tokens)} tokens: {res['prefill_s_median']:.3f} s median "
        f"({res['prefill_tokens_per_s']:.0f} tokens/s; C counters {c_prefill:.3f} s) | "
        f"decode {res['new_tokens']} tokens: {res['decode_tokens_per_s']:.1f} tokens/s median "
        f"(runs {', '.join(str(r) for r in res['decode_tokens_per_s_runs'])}; C counters {c_decode:.1f})"
    )
    print(f"text: {res['text']!r}")


if __name__ == "__main__":
    main()
