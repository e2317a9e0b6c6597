#!/usr/bin/env bash
# The GPU runs session 7 left for the next session (benchmarks/results/NOTES.md, "First thing next session"), one
# stage per device call (each under the 10-minute call limit), after `bash .gpu/a/stash.sh` in a first call:
#   source benchmarks/gpu_setup.sh > $OUT/all.log 2>&1 && bash benchmarks/gpu_next.sh STAGE $OUT
# STAGE: tests    the replay / fa4 / varlen / compile GPU tests (pytest -n 12; the timings of later stages are void
#                 while its xdist workers outlive a timeout, so run it last in a call or alone)
#        suite    the shape suite with attnlang_auto (issue 15), written to $OUT/shapes.{json,md}; suite_train /
#                 suite_infer: its training / inference groups, one call each
#        cells    session 9's over-target training cells, 3 rounds, and train_kernels_profile (after the leak fix)
#        compile  bench_compile (issue 18), $OUT/compile.{json,md}
#        rest     the GPU tests `tests` leaves out: sinks, hostile, trust, gpu_matrix's test and the sandwich example
#                 (its 32 cos terms compile for minutes), $OUT/tests_rest.log
#        latest   the BENCHMARKS.md-shape kernel benchmark (every row, 3 rounds), $OUT/latest.{json,md}
#        host     host_diag at hd64 (replay on / off side by side), $OUT/host_diag_s8.{json,md}
set -u
stage=$1
out=$2
export PYTHONUNBUFFERED=1
case "$stage" in
  tests)
    (cd tests && timeout -k 5 450 python3 -m pytest -m gpu -v -p no:cacheprovider --tb=short -n 12 \
      test_fa4_replay_gpu.py test_compile_gpu.py test_varlen_gpu.py test_flex_gpu.py test_fa4_gpu.py \
      -k "not sandwich" > "$out/tests.log" 2>&1)  # sandwich's 32 cos terms compile for minutes: its own call
    grep -E "passed|failed" "$out/tests.log" | tail -1
    grep FAILED "$out/tests.log" | head -20 ;;
  suite|suite_train|suite_infer)
    # the whole suite takes more than one call: suite_train (gqa, hd64) and suite_infer (long, decode) fit one each;
    # the JSON is written after every cell, so a cut run keeps what it measured
    case "$stage" in suite) groups="gqa hd64 long decode_q1 decode_q16" ;; suite_train) groups="gqa hd64" ;;
      *) groups="long decode_q1 decode_q16" ;; esac
    timeout 560 python3 benchmarks/bench_kernels.py --suite --groups $groups --budget 470 \
      --parallel-first 12 --out "$out" --name shapes > "$out/suite.log" 2>&1
    tail -60 "$out/shapes.md" ;;
  cells)
    # session 9's over-target training cells again after the leak fix, 3 rounds, contenders interleaved, and the
    # kernels / cudaMallocs of ten warm training steps (expect none per step now)
    timeout 300 python3 benchmarks/bench_kernels.py --suite --groups gqa hd64 \
      --variants causal sliding_window document_random alibi \
      --contenders flex_flash fa4_builtin fa4_varlen attnlang_fa4 attnlang_auto --rounds 3 --budget 260 \
      --parallel-first 12 --warm-timeout 120 --out "$out" --name shapes_cells > "$out/cells.log" 2>&1
    timeout 120 python3 benchmarks/train_kernels_profile.py --out "$out" >> "$out/cells.log" 2>&1
    grep -E "=====|cudaMalloc " "$out/train_kernels_profile.txt"; tail -40 "$out/shapes_cells.md" ;;
  rest)
    (cd tests && timeout -k 5 540 python3 -m pytest -m gpu -v -p no:cacheprovider --tb=short -n 12 \
      test_sinks_gpu.py test_hostile_gpu.py test_gpu_trust.py test_gpu_matrix.py "test_fa4_gpu.py::test_every_example" \
      -k "sandwich or not test_every_example" > "$out/tests_rest.log" 2>&1)
    grep -E "passed|failed" "$out/tests_rest.log" | tail -1
    grep FAILED "$out/tests_rest.log" | head -20 ;;
  latest)
    timeout 560 python3 benchmarks/bench_kernels.py --rounds 3 --parallel-first 12 --second-process \
      --out "$out" --name latest > "$out/latest.log" 2>&1
    tail -40 "$out/latest.md" ;;
  compile)
    timeout 300 python3 benchmarks/bench_compile.py --out "$out" > "$out/compile.log" 2>&1
    cat "$out/compile.md" ;;
  host)
    timeout 300 python3 benchmarks/host_diag.py --rows sliding_window causal document_random --shape 4 16 4096 64 \
      --n 50 --out "$out" --name host_diag_s8 > "$out/host.log" 2>&1
    cat "$out/host_diag_s8.md" ;;
  *)
    echo "unknown stage $stage: tests, rest, suite, suite_train, suite_infer, cells, latest, compile or host" >&2
    exit 2 ;;
esac
