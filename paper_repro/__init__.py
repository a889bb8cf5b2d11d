"""paper_repro: the FlashAttention paper's speed, memory, IO and sequence-length experiments, re-measured.

Dao et al., 2022, "FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness",
measured on an A100; here the same experiments run on whatever GPU is present, with numba_flash's
kernels beside PyTorch's standard attention and its SDPA backends:

    fig2_left     GPT-2 medium attention, forward + backward: GFLOPs, HBM bytes (ncu), runtime
    fig2_middle   forward runtime and HBM bytes as the tile (block) size grows
    fig2_right    block-sparse forward + backward runtime against the fraction of nonzero blocks
    fig3_left     forward, backward, forward + backward runtime against sequence length, 128 ... 64k
    fig3_right    peak memory against sequence length
    theorem2      forward HBM bytes against N, d and tile (SRAM) size, fitted to the theorem's terms
    table2        GPT-2 small (124M) trained a few hundred steps with each attention: tokens/s, memory,
                  loss curves

``python -m paper_repro [--quick] [--only NAME ...]`` runs them and regenerates ``REPORT.md``. Each
experiment writes ``results/<gpu>/<name>.json`` (raw numbers, GPU, versions, date, command line) and
``<name>.png``. Without a GPU everything runs under Numba's CUDA simulator at toy sizes, into
``results/simulator/``, and says so: those numbers check that the scripts work and are not measurements.
"""

EXPERIMENTS = ("fig2_left", "fig2_middle", "fig2_right", "fig3_left", "fig3_right", "theorem2", "table2")
