#!/usr/bin/env bash
# A kernel change's verification on a GPU, in stages that each fit one 10-minute remote call (H200 times):
#
#   tools/gpu_check.sh suite    OUT            GPU test suite without the sanitizer sweep (-n 16, ~290-340 s on
#                                              an H100; the log ends with the 25 slowest tests;
#                                              SUITE_TIMEOUT=seconds caps it, default 560)
#   tools/gpu_check.sh sanitize OUT CASE...    racecheck + memcheck of tools/sanitize.py cases, 6 processes
#                                              at a time (~60-90 s per case and tool); SANITIZE_TOOLS="racecheck
#                                              memcheck synccheck" adds synccheck (tests/test_sanitizer.py runs
#                                              all three on every case)
#   tools/gpu_check.sh bench    OUT [ARGS...]  fp16, d = 64 and 128, N = 1k/2k/4k/16k, causal and not, fwd
#                                              and fwd+bwd, against naive, SDPA FlashAttention-2 and cuDNN
#                                              (~130 s); ARGS replace those options (numba_flash.bench)
#   tools/gpu_check.sh host     OUT [ARGS...]  python tools/host_overhead.py ARGS (default: N = 1k and 4k, 8k
#                                              tokens, 12 heads, bf16): host against GPU ms per call, the
#                                              API, the torch op and autograd steps, with and without a
#                                              block mask (~60 s)
#   tools/gpu_check.sh tune     OUT ARGS...    python tools/tune.py ARGS (A/B of tile options in one run:
#                                              the spread between leases is ~10%, so compare in one call)
#   tools/gpu_check.sh ncu      OUT [D...]     ncu --clock-control none on one forward and one backward per
#                                              head dim (default 64 128; fp16, N=4096): duration, tensor-pipe
#                                              and issue utilisation, warp stall reasons (~60 s per kernel)
#   tools/gpu_check.sh profile  OUT IMPL D CAUSAL PASS
#                                              ncu --set full (source counters included) on one call's kernels
#                                              (tools/profile_step.py: IMPL numba_flash, sdpa_cudnn or sdpa_flash;
#                                              PASS fwd or bwd; N=4096, fp16): the report, its details page and
#                                              its per-SASS-instruction source page (csv) (~30-60 s per kernel;
#                                              python tools/ncu_sass_stats.py summarises the csv)
#   tools/gpu_check.sh tf32     OUT            the split-TF32 forward: tests/test_tf32.py (-n 8), tools/tune.py
#                                              at d = 64 (the pre-split default against the warp-specialised
#                                              body on pre-split images, ring 4, and the bodies that split in
#                                              the block: synchronous 128 x 64, warp-specialised 128 x 32) and
#                                              the fp32 benchmark against SIMT and SDPA memory-efficient at
#                                              N = 4096 (~200 s on an H100)
#   tools/gpu_check.sh paper    OUT NAME...    python -m paper_repro --quick --only NAME... into OUT/paper
#                                              (copy its JSON/PNG into paper_repro/results/<gpu>/ and run
#                                              python -m paper_repro --report-only to update REPORT.md)
#
# Every stage writes its log (and the benchmark's .md/.json) under OUT and prints a summary line. The device
# tool returns only a few files from its $OUT: give the stages a folder elsewhere and tar it into $OUT. The GPU
# image's numpy must be < 2.5 (numba-cuda 0.30 calls np.row_stack); the stage refuses to run otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:?stage: suite, sanitize, bench, host, tune, ncu, profile, tf32 or paper}
out=${2:?output folder}
shift 2
mkdir -p "$out"
python3 - <<'EOF' || exit 1
import sys, numpy
if tuple(int(x) for x in numpy.__version__.split(".")[:2]) >= (2, 5):
    sys.exit(f"numpy {numpy.__version__}: numba-cuda needs numpy < 2.5 first on the path")
EOF
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"

case "$stage" in
suite)
    timeout ${SUITE_TIMEOUT:-560} python3 -m pytest tests -q -n 16 --ignore=tests/test_sanitizer.py -p no:cacheprovider \
        --durations=25 \
        > "$out/suite.log" 2>&1
    echo "suite exit $?: $(tail -1 "$out/suite.log")"
    ;;
sanitize)
    [ $# -gt 0 ] || { echo "sanitize: name the cases (indices into tools/sanitize.py CASES)"; exit 2; }
    jobs_=()
    for c in "$@"; do
        for tool in ${SANITIZE_TOOLS:-racecheck memcheck}; do
            extra=(); [ "$tool" = racecheck ] && extra=(--racecheck-report hazard)
            ( timeout 540 compute-sanitizer --tool "$tool" "${extra[@]}" python3 tools/sanitize.py "$c" \
                > "$out/sanitize-$c-$tool.log" 2>&1; echo "$?" > "$out/sanitize-$c-$tool.rc" ) &
            jobs_+=($!)
            while [ "$(jobs -rp | wc -l)" -ge 6 ]; do sleep 2; done
        done
    done
    wait
    for f in "$out"/sanitize-*.log; do
        n=${f%.log}
        echo "$(basename "$n"): exit $(cat "$n.rc"), $(grep -i -E 'Invalid __(global|shared|local)__|Misaligned|Out-of-range|Race reported|hazard|Barrier error|divergent' "$f" | grep -c -v -E '\b0 hazards') reports, $(grep -E '^(ok|FAIL) ' "$f" | cut -c1-4 | tr '\n' ' ')"
    done
    ;;
bench)
    args=("$@")
    [ ${#args[@]} -gt 0 ] || args=(--d 64,128 --N 1024,2048,4096,16384 --dtype float16 --causal 0,1
                                   --pass fwd,fwd+bwd --impl numba_flash,naive,sdpa_flash,sdpa_cudnn)
    timeout 560 python3 -m numba_flash.bench "${args[@]}" --out "$out/bench" > "$out/bench.log" 2>&1
    echo "bench exit $?"; grep -E "numba_flash[a-z_]* / " "$out/bench.md" | head -40
    ;;
host)
    args=("$@")
    [ ${#args[@]} -gt 0 ] || args=(--seqlen 1024 4096 --tokens 8192 --nheads 12 --dtype bfloat16 --calls 50)
    timeout 300 python3 tools/host_overhead.py "${args[@]}" > "$out/host.log" 2>&1
    echo "host exit $?"; grep -E "^\|" "$out/host.log" | head -40
    ;;
tune)
    timeout 560 python3 tools/tune.py "$@" > "$out/tune.log" 2>&1
    echo "tune exit $?"; tail -20 "$out/tune.log"
    ;;
ncu)
    dims=("$@"); [ ${#dims[@]} -gt 0 ] || dims=(64 128)
    for d in "${dims[@]}"; do
        printf '%s\n' "import torch, numba_flash as nf" \
            "B, N, d = 4, 4096, $d" \
            "q, k, v, do = (torch.randn(B, N, 2048 // d, d, device='cuda', dtype=torch.float16) for _ in range(4))" \
            "out, lse = nf.flash_attn_forward(q, k, v)" \
            "nf.flash_attn_backward(do, q, k, v, out, lse)" \
            "torch.cuda.synchronize()" > "$out/ncu_step.py"
        timeout 280 ncu --clock-control none --kernel-name regex:flash_ --launch-count 4 \
            --section SpeedOfLight --section Occupancy --section SchedulerStats --section WarpStateStats \
            --metrics sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active \
            python3 "$out/ncu_step.py" > "$out/ncu-d$d.txt" 2>&1
        echo "ncu d=$d exit $?: $(grep -c -E '^ +flash_' "$out/ncu-d$d.txt") kernels profiled"
        grep -E "^ +flash_|Duration|gmma_cycles_active|pipe_xu|Issue Slots Busy|No Eligible|Stall" "$out/ncu-d$d.txt" | head -40
    done
    ;;
profile)
    [ $# -eq 4 ] || { echo "profile: IMPL D CAUSAL PASS"; exit 2; }
    tag="$1-d$2-c$3-$4"
    timeout 300 ncu --clock-control none --nvtx --nvtx-include "prof/" --set full --import-source no \
        -f -o "$out/prof-$tag" python3 tools/profile_step.py --impl "$1" --d "$2" --causal "$3" --pass "$4" \
        > "$out/prof-$tag.log" 2>&1
    echo "profile $tag exit $?"
    ncu --import "$out/prof-$tag.ncu-rep" --page details > "$out/prof-$tag-details.txt" 2>&1
    ncu --import "$out/prof-$tag.ncu-rep" --page source --print-source sass --csv \
        > "$out/prof-$tag-sass.csv" 2>&1
    grep -E "^  [a-zA-Z_].*\(|Duration|Registers Per|Issue Slots Busy|No Eligible|Achieved Occupancy" \
        "$out/prof-$tag-details.txt" | head -30
    ;;
tf32)
    timeout 150 python3 -m pytest tests/test_tf32.py -q -n 8 -p no:cacheprovider > "$out/tf32-tests.log" 2>&1
    echo "tf32 tests exit $?: $(tail -1 "$out/tf32-tests.log")"
    timeout 150 python3 tools/tune.py --backend tf32 --dtype float32 --d 64 --N 4096 --causal 0 fwd \
        "fwd=128,32,8,0,0,4,0,0,0,0,0,0,1" "fwd=128,64,8,0,0,0,0,0,0,0,0,0,0" "fwd=128,32,8,0,0,2,0,0,0,0,0,0,0" \
        > "$out/tf32-tune.log" 2>&1
    echo "tf32 tune exit $?"; grep TFLOP "$out/tf32-tune.log"
    timeout 150 python3 -m numba_flash.bench --dtype float32 --impl numba_flash_tf32,numba_flash,sdpa_efficient \
        --d 64,128 --N 4096 --causal 0,1 --pass fwd --out "$out/tf32-bench" > "$out/tf32-bench.log" 2>&1
    echo "tf32 bench exit $?"; grep -E "^###|^\| [0-9]" "$out/tf32-bench.md" | head -16
    ;;
paper)
    [ $# -gt 0 ] || { echo "paper: name the experiments (python -m paper_repro --help)"; exit 2; }
    timeout 560 python3 -m paper_repro --quick --only "$@" --out "$out/paper" > "$out/paper.log" 2>&1
    echo "paper_repro exit $?"; tail -5 "$out/paper.log"
    ;;
*)
    echo "unknown stage $stage"; exit 2
    ;;
esac
