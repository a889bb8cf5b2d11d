"""Table 2 (end to end): GPT-2 small trained a few hundred steps with each attention implementation.

A 124M-parameter GPT-2 (12 layers, 12 heads of 64, hidden 768, vocabulary 50257, tied embeddings) written
here with torch, random initialisation (the same seed for every implementation), AdamW, bfloat16
autocast. The tokens come from a fixed random Markov chain (every token has 8 possible successors with
random probabilities), generated on the device: nothing is downloaded, and the loss has somewhere to go
(from ln 50257 = 10.8 towards the chain's entropy). Each implementation trains the same steps on the same
batches at sequence length 1k and 4k; reported are tokens per second (after the first steps), peak
memory, and the loss curves, which should agree between implementations up to bfloat16 rounding.

The paper's Table 2 trains GPT-2 small and medium on OpenWebText to convergence on 8 A100s (3.5x faster
than HuggingFace, 1.7x than Megatron-LM); a few hundred steps on one GPU measure the same speed and
memory effect, not the final perplexity.
"""
from __future__ import annotations

import math
import time

from . import common

NAME = "table2"
TITLE = "Table 2: GPT-2 small training throughput, memory and loss"
PAPER = {"setting": "GPT-2 small on OpenWebText, 8 x A100: HuggingFace 9.5 days, Megatron-LM 4.7 days, "
                    "FlashAttention 2.7 days (3.5x / 1.7x faster), same perplexity 18.2"}
IMPLS = ("numba_flash", "sdpa_flash", "naive")


def _model(torch, cfg, attention):
    nn, F = torch.nn, torch.nn.functional

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            c = cfg["hidden"]
            self.ln1, self.ln2 = nn.LayerNorm(c), nn.LayerNorm(c)
            self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
            self.fc, self.out = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)

        def forward(self, x):
            B, T, C = x.shape
            q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, cfg["heads"], C // cfg["heads"]).unbind(2)
            x = x + self.proj(attention(q, k, v).reshape(B, T, C))
            return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(cfg["vocab"], cfg["hidden"])
            self.wpe = nn.Embedding(cfg["seq"], cfg["hidden"])
            self.blocks = nn.ModuleList(Block() for _ in range(cfg["layers"]))
            self.ln = nn.LayerNorm(cfg["hidden"])
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, std=0.02)
                    if getattr(m, "bias", None) is not None:
                        nn.init.zeros_(m.bias)

        def forward(self, idx):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
            for b in self.blocks:
                x = b(x)
            return self.ln(x) @ self.wte.weight.T        # tied embeddings

    return GPT()


def attention_fn(torch, impl):
    """(B, T, H, D) -> (B, T, H, D), causal."""
    F = torch.nn.functional
    if impl == "numba_flash":
        import numba_flash as nf
        return lambda q, k, v: nf.flash_attn_func(q, k, v, causal=True)
    if impl == "sdpa_flash":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                      is_causal=True).transpose(1, 2)
        return sdpa

    def naive(q, k, v):
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        s = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        mask = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu_(1)
        return (torch.softmax(s.masked_fill(mask, float("-inf")), -1) @ v).transpose(1, 2)
    return naive


def markov_tokens(torch, vocab, nseq, seq, device, seed=0):
    """nseq sequences of seq tokens from a fixed random chain with 8 successors per token."""
    g = torch.Generator(device=device).manual_seed(seed)
    succ = torch.randint(0, vocab, (vocab, 8), generator=g, device=device)
    probs = torch.rand((vocab, 8), generator=g, device=device) ** 2
    probs /= probs.sum(-1, keepdim=True)
    out = torch.empty((nseq, seq), dtype=torch.long, device=device)
    cur = torch.randint(0, vocab, (nseq,), generator=g, device=device)
    for t in range(seq):
        out[:, t] = cur
        pick = torch.multinomial(probs[cur], 1, generator=g).squeeze(1)
        cur = succ[cur, pick]
    return out


def settings(ctx):
    if ctx.simulate:
        model = dict(layers=1, heads=2, hidden=32, vocab=64)
        return model, [dict(seq=32, batch=1, steps=2)], ("numba_flash", "naive")
    model = dict(layers=12, heads=12, hidden=768, vocab=50257)
    runs = ([dict(seq=1024, batch=8, steps=40), dict(seq=4096, batch=2, steps=30)] if ctx.quick else
            [dict(seq=1024, batch=8, steps=300), dict(seq=4096, batch=2, steps=200)])
    return model, runs, IMPLS


def train(ctx, torch, model_cfg, run, impl, data):
    cfg = dict(model_cfg, seq=run["seq"])
    torch.manual_seed(0)
    model = _model(torch, cfg, attention_fn(torch, impl)).to(ctx.device)
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, run["steps"] // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    losses, times = [], []
    if not ctx.simulate:
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    per_step = run["batch"] * run["seq"]
    for step in range(run["steps"]):
        i = (step * run["batch"]) % (data.shape[0] - run["batch"] + 1)
        batch = data[i:i + run["batch"], :run["seq"] + 1]
        t0 = time.perf_counter()
        with torch.autocast(device_type=ctx.device, dtype=torch.bfloat16, enabled=not ctx.simulate):
            logits = model(batch[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]),
                                                     batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())            # synchronises: the step is done
        times.append(time.perf_counter() - t0)
    skip = min(len(times) - 1, max(1, len(times) // 5))      # compilation and warm-up steps
    tokens_per_s = per_step * (len(times) - skip) / sum(times[skip:])
    peak = None if ctx.simulate else torch.cuda.max_memory_allocated() / 2**30
    del model, opt
    if not ctx.simulate:
        torch.cuda.empty_cache()
    return {"impl": impl, "seq": run["seq"], "batch": run["batch"], "steps": run["steps"], "status": "ok",
            "losses": losses, "tokens_per_s": tokens_per_s, "peak_gib": peak}


def run(ctx):
    import torch

    model_cfg, runs, impls = settings(ctx)
    rows = []
    grid = [(r, i) for r in runs for i in impls]
    data = {}
    for r, impl in ctx.progress(grid, NAME):
        need = r["batch"] * r["steps"]
        key = r["seq"]
        if key not in data:
            data[key] = markov_tokens(torch, model_cfg["vocab"], min(need, 512), r["seq"] + 1, ctx.device)
        try:
            rows.append(train(ctx, torch, model_cfg, r, impl, data[key]))
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            rows.append({"impl": impl, "seq": r["seq"], "batch": r["batch"], "status": "OOM"})
        except Exception as e:          # a backend that refuses (no GPU kernel for this dtype, ...)
            rows.append({"impl": impl, "seq": r["seq"], "batch": r["batch"], "status": "error",
                         "note": f"{type(e).__name__}: {str(e)[:200]}"})
    return {"model": model_cfg, "rows": rows, "paper": PAPER,
            "params_m": _params(model_cfg) / 1e6}


def _params(m):
    c, L, V = m["hidden"], m["layers"], m["vocab"]
    return V * c + L * (12 * c * c + 13 * c)


def plot(result, path, simulated):
    seqs = sorted({r["seq"] for r in result["rows"]})
    fig, axes = common.figure(len(seqs), width=5.0)
    for ax, seq in zip(axes, seqs):
        for r in result["rows"]:
            if r["seq"] == seq and r["status"] == "ok":
                ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=r["impl"], alpha=0.8)
        ax.set_title(f"seq. length {seq}")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=7)
    common.finish(fig, path, simulated, TITLE)


def summary(result):
    rows = result["rows"]
    table = common.md_table(
        ["seq", "batch", "impl", "steps", "tokens/s", "peak GiB", "first loss", "last loss"],
        [[r["seq"], r["batch"], r["impl"], r.get("steps", "—"),
          common.fmt(r.get("tokens_per_s"), "{:.0f}") if r["status"] == "ok" else r["status"],
          common.fmt(r.get("peak_gib"), "{:.1f}"), common.fmt(r["losses"][0] if r.get("losses") else None, "{:.3f}"),
          common.fmt(r["losses"][-1] if r.get("losses") else None, "{:.3f}")] for r in rows])
    m = result["model"]
    precision = "float32 (simulator)" if common.simulated(result) else "bfloat16 autocast"
    lines = [f"GPT-2: {m['layers']} layers, {m['heads']} heads, hidden {m['hidden']}, vocabulary {m['vocab']} "
             f"({result['params_m']:.3g}M parameters), {precision}, AdamW.", "", table, ""]
    if common.simulated(result):
        lines.append(common.SIMULATED_RATIOS)
    for seq in sorted({r["seq"] for r in rows}):
        by = {r["impl"]: r for r in rows if r["seq"] == seq and r["status"] == "ok"}
        nf, ref = by.get("numba_flash"), by.get("naive") or by.get("sdpa_flash")
        if nf and ref:
            n = min(len(nf["losses"]), len(ref["losses"]))
            gap = max(abs(a - b) for a, b in zip(nf["losses"][:n], ref["losses"][:n]))
            parts = [f"seq {seq}: numba_flash trains at {nf['tokens_per_s']:.0f} tokens/s"]
            for other in ("naive", "sdpa_flash"):
                if other in by and not common.simulated(result):
                    parts.append(f"{nf['tokens_per_s'] / by[other]['tokens_per_s']:.2f}x {other}")
            lines.append(", ".join(parts) + f"; its loss curve stays within {gap:.3f} of {ref['impl']}'s "
                         f"(loss {nf['losses'][0]:.2f} → {nf['losses'][-1]:.2f}, ln V = "
                         f"{math.log(m['vocab']):.2f}).")
    return "\n".join(lines)
