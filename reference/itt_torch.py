"""PyTorch twin of the `itt` models (dense, Loop, ITT) for side-by-side speed measurements.

Same shapes, init scheme and optimiser as the Rust code (src/model/, src/model/thinking.rs,
src/optim.rs): LLaMA-style pre-norm decoder, RMSNorm, rotate-half RoPE, causal attention
(scaled_dot_product_attention), SwiGLU, untied head; ITT layers (every other layer) with
per-step routers Linear(d -> 1) + sigmoid, per-sequence top-k, accumulation scaled by the router
weight and phi_t; Loop re-runs the layer. AdamW (0.9, 0.95), weight decay 0.1 on matrices,
gradient clipping 1.0.

    python reference/itt_torch.py bench --preset small --vocab 4096 --steps 5 [--bf16]
    python reference/itt_torch.py decode --preset tiny-itt4 --prompt-len 128 --new-tokens 64

Prints one JSON line per measurement. Not used by the test suite.
"""

import argparse
import json
import math
import resource
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

SIZES = {
    # vocab, d, layers, heads, mlp, ctx, batch, seq
    "tiny": (512, 128, 4, 4, 352, 256, 16, 128),
    "small": (4096, 256, 4, 4, 688, 512, 8, 256),
}


def parse_preset(name):
    kind, steps = "dense", 1
    for k in ("itt", "loop"):
        if f"-{k}" in name:
            name, t = name.rsplit(f"-{k}", 1)
            kind, steps = k, int(t)
    v, d, l, h, m, ctx, b, t = SIZES[name]
    return dict(vocab=v, d=d, layers=l, heads=h, mlp=m, ctx=ctx, batch=b, seq=t, kind=kind, steps=steps, ratios=[0.7] * (steps - 1))


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(ctx, hd, theta=10000.0):
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    ang = torch.arange(ctx, dtype=torch.float32)[:, None] * inv[None, :]
    return ang.cos(), ang.sin()


def apply_rope(x, cos, sin):
    # x: (B, H, T, hd); cos, sin: (B, 1, T, hd/2) gathered at each token's position.
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, self.h = c["d"], c["heads"]
        self.attn_norm, self.mlp_norm = RMSNorm(d), RMSNorm(d)
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.w_gate, self.w_up = nn.Linear(d, c["mlp"], bias=False), nn.Linear(d, c["mlp"], bias=False)
        self.w_down = nn.Linear(c["mlp"], d, bias=False)

    def attn(self, x, cos, sin, cache):
        b, t, d = x.shape
        hd = d // self.h
        q, k, v = (w(x).view(b, t, self.h, hd).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            if cache:
                k = torch.cat([cache[0], k], 2)
                v = torch.cat([cache[1], v], 2)
            cache[:] = [k, v]
        causal = k.shape[2] == t
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal and t > 1)
        return self.wo(o.transpose(1, 2).reshape(b, t, d))

    def forward(self, x, cos, sin, cache=None):
        h = x + self.attn(self.attn_norm(x), cos, sin, cache)
        y = self.mlp_norm(h)
        return h + self.w_down(F.silu(self.w_gate(y)) * self.w_up(y))


class Model(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        d = c["d"]
        self.embed = nn.Embedding(c["vocab"], d)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c["layers"]))
        self.thinking = [i % 2 == 1 and c["kind"] != "dense" for i in range(c["layers"])]
        T = c["steps"]
        if c["kind"] == "itt":
            self.phis = nn.ParameterList(
                nn.Parameter(torch.full((d,), 1.0 if t == 0 else 0.1)) for _ in range(c["layers"]) for t in range(T)
            )
            self.routers = nn.ModuleList(nn.Linear(d, 1) for _ in range(c["layers"] * (T - 1)))
        self.norm = RMSNorm(d)
        self.head = nn.Linear(d, c["vocab"], bias=False)
        cos, sin = rope_tables(c["ctx"], d // c["heads"])
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)
        self.init_weights()

    def init_weights(self):
        std = 0.02
        out_std = std / math.sqrt(2 * self.c["layers"])
        for n, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, 0.0, out_std if n.endswith(("wo.weight", "w_down.weight")) else std)
            if "routers" in n and n.endswith("bias"):
                nn.init.zeros_(p)

    def rope_at(self, pos):
        # pos: (B, T) -> (B, 1, T, hd/2)
        return self.cos[pos][:, None], self.sin[pos][:, None]

    def think(self, i, block, x, pos, caches, thresholds):
        c = self.c
        T = c["steps"]
        cos, sin = self.rope_at(pos)
        slot = (lambda t: caches[i][t]) if caches is not None else (lambda t: None)
        if c["kind"] == "loop":
            for t in range(T):
                x = block(x, cos, sin, slot(t))
            return x
        phi = lambda t: self.phis[i * T + t]
        x = phi(0) * block(x, cos, sin, slot(0))
        b, n, d = x.shape
        for t in range(1, T):
            logit = self.routers[i * (T - 1) + t - 1](x).squeeze(-1)  # (B, n)
            w = torch.sigmoid(logit)
            if thresholds is None:
                k = math.ceil(c["ratios"][t - 1] * n - 1e-9)
                if k == 0:
                    continue
                idx = logit.topk(k, dim=1).indices.sort(dim=1).values  # (B, k), causal order kept
            else:
                # Causal decode, batch 1: the token takes the step iff its logit passes tau.
                sel = (logit[0] > thresholds[(i, t)]).nonzero().squeeze(-1)
                if sel.numel() == 0:
                    continue
                idx = sel[None]
            gi = idx[..., None].expand(-1, -1, d)
            xs = x.gather(1, gi)
            pos_s = pos.gather(1, idx)
            cs, ss = self.rope_at(pos_s)
            y = block(xs, cs, ss, slot(t))
            upd = w.gather(1, idx)[..., None] * phi(t) * y
            x = x.scatter_add(1, gi, upd)
        return x

    def forward(self, tok, pos=None, caches=None, thresholds=None):
        b, t = tok.shape
        if pos is None:
            pos = torch.arange(t)[None].expand(b, t)
        x = self.embed(tok)
        for i, block in enumerate(self.blocks):
            if self.thinking[i]:
                x = self.think(i, block, x, pos, caches, thresholds)
            else:
                cos, sin = self.rope_at(pos)
                x = block(x, cos, sin, caches[i][0] if caches is not None else None)
        return self.head(self.norm(x))

    def new_caches(self):
        return [[[] for _ in range(self.c["steps"] if th else 1)] for th in self.thinking]


def optimizer(model):
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and "routers" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() == 2 and "routers" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=1e-4, betas=(0.9, 0.95))


def bench_train(c, steps, bf16):
    torch.manual_seed(0)
    model = Model(c)
    opt = optimizer(model)
    b, t, v = c["batch"], c["seq"], c["vocab"]
    times = []
    for i in range(steps + 1):
        x = torch.randint(0, v, (b, t))
        y = torch.randint(0, v, (b, t))
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float().view(-1, v), y.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if i > 0:
            times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    return dict(kind="train", step_s_median=med, step_s_min=times[0], tokens_per_s=b * t / med, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


@torch.no_grad()
def bench_decode(c, prompt_len, new_tokens):
    torch.manual_seed(0)
    model = Model(c).eval()
    v = c["vocab"]
    thresholds = None
    if c["kind"] == "itt":
        # Thresholds at the (1 - rho) quantile of router logits on random text, as `itt calibrate`.
        logits = {}
        hooks = []
        T = c["steps"]
        for i in range(c["layers"]):
            for t in range(1, T):
                r = model.routers[i * (T - 1) + t - 1]
                hooks.append(r.register_forward_hook(lambda m, a, o, key=(i, t): logits.setdefault(key, []).append(o.flatten())))
        model(torch.randint(0, v, (4, prompt_len)))
        for h in hooks:
            h.remove()
        thresholds = {k: torch.quantile(torch.cat(x), 1 - c["ratios"][k[1] - 1]).item() for k, x in logits.items()}
    prompt = torch.randint(0, v, (1, prompt_len))
    model(prompt)  # warm-up
    caches = model.new_caches()
    t0 = time.perf_counter()
    model(prompt, caches=caches, thresholds=thresholds)
    prefill = time.perf_counter() - t0
    nxt = torch.randint(0, v, (new_tokens,))
    t0 = time.perf_counter()
    for j in range(new_tokens):
        pos = torch.tensor([[prompt_len + j]])
        model(nxt[j].view(1, 1), pos=pos, caches=caches, thresholds=thresholds)
    decode = time.perf_counter() - t0
    return dict(kind="decode", prefill_tokens_per_s=prompt_len / prefill, decode_cached_tokens_per_s=new_tokens / decode,
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["bench", "decode"])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--vocab", type=int)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    c = parse_preset(a.preset)
    if a.vocab:
        c["vocab"] = a.vocab
    if a.batch_size:
        c["batch"] = a.batch_size
    if a.seq_len:
        c["seq"] = a.seq_len
    r = bench_train(c, a.steps, a.bf16) if a.what == "bench" else bench_decode(c, a.prompt_len, a.new_tokens)
    r.update(preset=a.preset, system="pytorch " + torch.__version__ + (" bf16" if a.bf16 else ""), threads=a.threads)
    print(json.dumps(r))


if __name__ == "__main__":
    main()
