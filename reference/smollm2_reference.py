#!/usr/bin/env python3
"""Reference logits of SmolLM2-135M-Instruct (GGUF) from Hugging Face `transformers`.

This is the outside oracle of `tests/parity.rs` (see reference/README.md). It loads the
GGUF the project's fetch step provides, dequantized to float32 by transformers itself, and
writes for a fixed set of prompts: the token ids, the last-position logits (the full vector
for a few prompts, the top 50 plus a strided sample and summary numbers for the rest) and
greedy continuations.

    python3 scripts/fetch.py smollm2
    python3 -m venv /tmp/itt-ref-venv && /tmp/itt-ref-venv/bin/pip install torch transformers gguf numpy
    /tmp/itt-ref-venv/bin/python reference/smollm2_reference.py            # writes the fixture
    /tmp/itt-ref-venv/bin/python reference/smollm2_reference.py --check-export DIR

`--check-export DIR` loads a folder written by `itt export --format hf` (or a `model.gguf`
written by `itt export --format gguf`) with transformers and compares its tokenizer and logits
with the fixture (the round trip GGUF -> itt -> HF or GGUF). For a GGUF, transformers builds
the tokenizer itself (without the smollm split, see README), so `symbols` shows DIFFER there.
"""

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
GGUF_DIR = ROOT / ".cache" / "itt" / "models"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FIXTURE = ROOT / "tests" / "fixtures" / "smollm2_reference.json"
FULL_LOGITS = ROOT / "tests" / "fixtures" / "smollm2_reference_logits.bin"

# (name, text, keep the full logit vector)
PROMPTS = [
    ("capital", "The capital of France is", True),
    ("story", "Once upon a time, in a small village by the sea, there lived an old fisherman who", False),
    (
        "code",
        'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    if n < 2:\n        return n\n',
        True,
    ),
    (
        "multilingual",
        "Bonjour, je m'appelle Zoé et j'habite à Montréal. Über den Wolken muss die Freiheit grenzenlos sein. "
        "東京は日本の首都です。北京是中国的首都。 Привет, мир! مرحبا بالعالم 🦀🚀 ¿Dónde está la estación? "
        "1234 + 5678 = 6912",
        True,
    ),
    ("chat", "<|im_start|>user\nWhat is the largest planet in the solar system?<|im_end|>\n<|im_start|>assistant\n", False),
    ("symbols", "Café crème, naïve façade — ½ ≠ 0.5 😀👍🏽 “quoted” ‘text’\t\ttabs  and   spaces", False),
]
GREEDY = [("capital", 20), ("story", 20), ("chat", 20)]
TOP = 50
STRIDE = 256


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_gguf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = GGUF_DIR / GGUF_NAME
    if not path.exists():
        sys.exit(f"{path} is missing; run `python3 scripts/fetch.py smollm2` first")
    tok = AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(GGUF_DIR, gguf_file=GGUF_NAME, dtype=torch.float32)
    return tok, model.eval(), path


def with_smollm_split(tok):
    """The same tokenizer with llama.cpp's `smollm` pre-tokenizer rule (every \\p{N} character on
    its own, then GPT-2's regex), which the file declares in `tokenizer.ggml.pre` and SmolLM2's
    own tokenizer.json has as a `Digits(individual_digits=True)` step. transformers' GGUF
    converter has no entry for `smollm` and uses GPT-2's regex alone; the two differ only on
    text where a numeric character follows a space or another numeric character that the
    vocabulary can merge with (e.g. " ½")."""
    from tokenizers import pre_tokenizers

    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    return tok


def last_logits(model, ids):
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    return out.logits[0, -1].double().numpy()


def greedy(model, ids, n, eos):
    """Greedy decoding by hand (argmax of full forwards), with the smallest top-1 margin seen."""
    ids = list(ids)
    new, margins = [], []
    for _ in range(n):
        z = last_logits(model, ids)
        order = np.argsort(-z, kind="stable")
        margins.append(float(z[order[0]] - z[order[1]]))
        nxt = int(order[0])
        new.append(nxt)
        ids.append(nxt)
        if nxt == eos:
            break
    return new, min(margins)


def make_fixture():
    from importlib.metadata import version

    import transformers

    from transformers import AutoTokenizer

    tok, model, path = load_gguf()
    split_tok = with_smollm_split(AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF_NAME))
    eos = tok.convert_tokens_to_ids(tok.eos_token)
    prompts, full = [], []
    for name, text, keep_full in PROMPTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        ids_split = split_tok(text, add_special_tokens=False)["input_ids"]
        z = last_logits(model, ids)
        top = np.argsort(-z, kind="stable")[:TOP]
        entry = {
            "name": name,
            "text": text,
            "ids": ids,
            "ids_smollm_split": ids_split,
            "top": [[int(i), float(z[i])] for i in top],
            "strided": [float(x) for x in z[::STRIDE]],
            "l2": float(np.linalg.norm(z)),
            "mean": float(z.mean()),
            "argmax": int(top[0]),
            "full_offset": None,
        }
        if keep_full:
            entry["full_offset"] = sum(len(f) for f in full)
            full.append(z.astype("<f4"))
        prompts.append(entry)
        same = "same" if ids == ids_split else "differ"
        print(f"{name:13} {len(ids):3} tokens ({same} with the smollm split), argmax {tok.decode([int(top[0])])!r}")

    # HF's own generate() as a cross-check of the hand-written greedy loop.
    by_name = {p["name"]: p for p in prompts}
    continuations = []
    for name, n in GREEDY:
        ids = by_name[name]["ids"]
        new, margin = greedy(model, ids, n, eos)
        with torch.no_grad():
            hf = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()
        assert hf == new, (name, hf, new)
        continuations.append({"prompt": name, "new_ids": new, "text": tok.decode(new), "min_margin": margin})
        print(f"greedy {name}: {tok.decode(new)!r} (smallest top-1 margin {margin:.3f})")

    FULL_LOGITS.write_bytes(b"".join(f.tobytes() for f in full))
    fixture = {
        "about": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to f32) run by Hugging Face transformers; "
        "written by reference/smollm2_reference.py",
        "gguf": {"file": GGUF_NAME, "sha256": sha256(path)},
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__, "gguf": version("gguf")},
        "ids_note": "ids: transformers' GGUF tokenizer as it is (the model inputs for the logits); ids_smollm_split: "
        "the same with llama.cpp's `smollm` rule of one token split per numeric character (tokenizer.ggml.pre)",
        "vocab_size": int(model.config.vocab_size),
        "eos_id": int(eos),
        "stride": STRIDE,
        "full_logits": {"file": FULL_LOGITS.name, "dtype": "f32-le", "count": len(full)},
        "prompts": prompts,
        "greedy": continuations,
    }
    FIXTURE.write_text(json.dumps(fixture, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size} bytes) and {FULL_LOGITS} ({FULL_LOGITS.stat().st_size} bytes)")


def check_export(folder):
    """Load an `itt export --format hf` folder with transformers and compare with the fixture."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fx = json.loads(FIXTURE.read_text())
    full = np.frombuffer(FULL_LOGITS.read_bytes(), dtype="<f4")
    path = Path(folder)
    if path.suffix == ".gguf":  # an `itt export --format gguf` file
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    else:
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    worst = 0.0
    for p in fx["prompts"]:
        ids = tok(p["text"], add_special_tokens=False)["input_ids"]
        same_ids = ids == p["ids_smollm_split"]
        z = last_logits(model, p["ids"])
        if p["full_offset"] is not None:
            ref = full[p["full_offset"] : p["full_offset"] + len(z)].astype(np.float64)
            got = z
        else:
            idx = [i for i, _ in p["top"]]
            ref = np.array([v for _, v in p["top"]] + p["strided"])
            got = np.concatenate([z[idx], z[:: fx["stride"]]])
        rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
        worst = max(worst, rel)
        print(f"{p['name']:13} ids {'same' if same_ids else 'DIFFER'}  rel L2 {rel:.2e}  max |diff| {np.abs(got - ref).max():.2e}")
    for g in fx["greedy"]:
        ids = next(p["ids"] for p in fx["prompts"] if p["name"] == g["prompt"])
        new, _ = greedy(model, ids, len(g["new_ids"]), fx["eos_id"])
        print(f"greedy {g['prompt']}: {'same' if new == g['new_ids'] else 'DIFFER'} {tok.decode(new)!r}")
    print(f"worst relative L2 {worst:.2e}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check-export", metavar="DIR", help="compare an `itt export --format hf` folder with the fixture")
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    if a.check_export:
        check_export(a.check_export)
    else:
        make_fixture()
