#!/bin/bash
# Runs one libFuzzer target from its committed seeds until the process has
# used CPU_SECONDS of CPU (user + sys), then stops it with SIGINT so libFuzzer
# prints its final statistics. -max_total_time counts wall time, which on a
# shared machine says little about how much fuzzing was done.
# Usage: fuzz/run_cpu_budget.sh <target> <cpu_seconds> <scratch_dir>
set -u
t=$1; budget=$2; out=$3
mkdir -p "$out/corpus_$t" "$out/artifacts_$t"
start=$(date +%s)
"build/fuzz/fuzz_$t" -max_total_time=1000000 -print_final_stats=1 \
  -artifact_prefix="$out/artifacts_$t/" "$out/corpus_$t" "fuzz/corpus/$t" \
  >"$out/log_$t.txt" 2>&1 &
pid=$!
tck=$(getconf CLK_TCK)
cpu=0
while kill -0 "$pid" 2>/dev/null; do
  sleep 10
  read -r -a st 2>/dev/null <"/proc/$pid/stat" || break
  cpu=$(( (st[13] + st[14]) / tck ))
  [ "$cpu" -ge "$budget" ] && kill -INT "$pid"
done
wait "$pid"
rc=$?
# slow-unit-* files are libFuzzer notes about slow inputs, not failures.
crashes=$(find "$out/artifacts_$t" -type f ! -name "slow-unit-*" | wc -l)
echo "$t: cpu ${cpu}s wall $(( $(date +%s) - start ))s rc $rc" \
     "corpus $(find "$out/corpus_$t" -type f | wc -l) files" \
     "$(du -sb "$out/corpus_$t" | cut -f1) bytes, crash artifacts $crashes"
[ "$crashes" -eq 0 ]
