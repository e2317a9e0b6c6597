#!/usr/bin/env bash
# Session 9's last GPU call (after `bash .gpu/a/stash.sh` in a first call):
#   source benchmarks/gpu_setup.sh > $OUT/all.log 2>&1 && bash benchmarks/gpu_s9.sh $OUT
# 1. the GPU tests of this session's two fixes (op: named tensors as themselves; flex: donated-buffer probe);
# 2. host_diag at hd64 with where each contender's FA4 calls ended up (replay or own);
# 3. the suite cells over target in shapes_train / shapes_infer again, 3 rounds each, contenders interleaved.
set -u
out=$1
export PYTHONUNBUFFERED=1
(cd tests && timeout -k 5 110 python3 -m pytest -m gpu -v -p no:cacheprovider --tb=short -n 8 \
  test_fa4_replay_gpu.py test_compile_gpu.py -k "documents or alibi or causal or window" > "$out/tests.log" 2>&1)
grep -E "passed|failed" "$out/tests.log" | tail -1; grep FAILED "$out/tests.log" | head
sleep 3
timeout 100 python3 benchmarks/host_diag.py --rows sliding_window document_random --shape 4 16 4096 64 --n 30 \
  --out "$out" --name host_diag_s9 >> "$out/all.log" 2>&1
cat "$out/host_diag_s9.md"
timeout 190 python3 benchmarks/bench_kernels.py --suite --groups gqa hd64 \
  --variants causal sliding_window document_random alibi \
  --contenders flex_flash fa4_builtin fa4_varlen attnlang_fa4 attnlang_auto --rounds 3 --budget 160 \
  --parallel-first 12 --warm-timeout 90 --out "$out/r3" --name shapes_r3a >> "$out/all.log" 2>&1
timeout 110 python3 benchmarks/bench_kernels.py --suite --groups long decode_q1 --variants sliding_window rel_table \
  --contenders flex_flash flex_default fa4_builtin attnlang_fa4 attnlang_auto --rounds 3 --budget 80 \
  --parallel-first 12 --warm-timeout 50 --out "$out/r3" --name shapes_r3b >> "$out/all.log" 2>&1
rm -f "$out"/r3/*.md
grep -E "^suite:" "$out/all.log"
