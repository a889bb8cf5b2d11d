"""pytest-benchmark: numba_flash vs PyTorch's naive attention vs the SDPA backends, on one GPU.

    python -m pytest benchmarks --benchmark-only --benchmark-group-by=group \\
        --benchmark-columns=median,iqr,rounds --benchmark-autosave

One benchmark group per configuration (d, N, dtype, pass), one row per implementation, so a group reads
as the comparison. Shapes follow the project's benchmark: batch x seqlen = 16384 tokens, hidden 2048,
non-causal. The timed call synchronises CUDA before it returns, so pytest-benchmark's host clock sees the
GPU work; --benchmark-autosave (or --benchmark-json=PATH) keeps the numbers for comparisons across
commits (pytest-benchmark compare). Each test also records its TFLOP/s in extra_info.

Inputs, implementations and the n/a rules are numba_flash.bench's; for TFLOP/s tables over the full
sweep timed with CUDA events use ``python -m numba_flash.bench``. Without a GPU (or under the CUDA
simulator) every test is collected and skipped, and pytest exits with status 0.
"""
import pytest

from numba_flash.bench.problem import DEFAULT_IMPLS, Config, attention_flops

TOKENS, HIDDEN = 16384, 2048
IMPLS = ("numba_flash", "numba_flash_nd", *DEFAULT_IMPLS[1:])
CONFIGS = [(d, n, dtype) for d in (64, 128) for n in (1024, 4096) for dtype in ("float16",)]
CONFIGS += [(64, 4096, "bfloat16"), (64, 4096, "float32")]
PASSES = ("fwd", "fwd+bwd")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("d,seqlen,dtype", CONFIGS, ids=[f"d{d}-N{n}-{t}" for d, n, t in CONFIGS])
def test_attention_speed(gpu, benchmark, d, seqlen, dtype, pass_, impl):
    import torch

    from numba_flash import bench

    cfg = Config.from_tokens(TOKENS, HIDDEN, seqlen, d, dtype, causal=False)
    benchmark.group = f"d={d} N={seqlen} {dtype} {pass_} (B={cfg.batch}, H={cfg.nheads})"
    q, k, v, dout = bench.make_inputs(cfg)
    try:
        forward, context = bench.make_forward(impl, q, k, v, causal=False)
    except bench.Unavailable as e:
        pytest.skip(f"{impl}: {e}")
    status, note = bench.probe(forward, context)
    if status != "ok":
        pytest.skip(f"{impl} {status} for {cfg.label()}: {note}")

    step = bench.pass_step(pass_, forward, q, k, v, dout)

    def timed():
        q.grad = k.grad = v.grad = None  # fwd+bwd: each backward starts from empty grads
        step()
        torch.cuda.synchronize()

    with context():
        benchmark.pedantic(timed, warmup_rounds=3, rounds=20, iterations=1)
        out = forward()
    flops = attention_flops(cfg, pass_)
    benchmark.extra_info.update(impl=impl, pass_=pass_, gflop=flops / 1e9, **vars(cfg))
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["tflops_median"] = flops / stats.stats.median / 1e12
    assert out.shape == q.shape
    assert torch.isfinite(out).all(), f"{impl} produced NaN/inf"
    if pass_ == "fwd+bwd":
        assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in (q, k, v))
