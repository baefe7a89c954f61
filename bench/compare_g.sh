#!/usr/bin/env bash
# bench/compare_g.sh — the G comparison: builds the benchmarks (Release) if needed, runs the decode and prefill
# subset with their baselines in the same binary runs, writes Google Benchmark JSON, prints the tables and the
# ratio checks (bench/report.py) and, when matplotlib is there, plots time and KV bytes against G (bench/plot.py).
#
#   bench/compare_g.sh [options]
#     --build DIR      build directory (default: build, relative to the current directory); configured as
#                      Release with the benchmarks on if it has no CMakeCache.txt, then the two targets are built
#                      (a no-op when up to date)
#     --out DIR        where the JSON, the logs and the PNG go (default: DIR/bench-results)
#     --reps N         repetitions of each timed benchmark; the report keeps the best (default 3)
#     --min-time SEC   --benchmark_min_time per repetition (default 0.2)
#     --seq S          decode cache length (default 16384)
#     --full           also prefill for all six G, and the S = 32768 prefill memory run (adds minutes)
#     --memory         also the S = 32768 prefill memory run (~2 minutes at 2 threads)
#     --smoke          seconds, not minutes: tiny shapes (decode S = 1024, prefill S = 512), one repetition, no
#                      reference runs; checks that the whole chain works, the numbers mean nothing
#     --no-build       use the binaries as they are
#     --no-plot        skip the PNG
#     --strict         exit 1 when a ratio check fails
#
# Needs: bash, cmake, make and g++ (unless --no-build), python3 (the tables); python3-matplotlib for the plot.
# Output: DIR/decode.json, decode_ref.json, prefill.json, prefill_ref.json[, prefill_memory.json], *.log,
# machine.txt, and DIR/decode_vs_G.png. About 5 minutes of benchmarks on 2 cores with the defaults.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
build=build out="" reps=3 min_time=0.2 seq=16384 full=0 memory=0 smoke=0 do_build=1 do_plot=1 strict=""

usage() { sed -n '2,26p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --build) build="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --reps) reps="$2"; shift 2 ;;
    --min-time) min_time="$2"; shift 2 ;;
    --seq) seq="$2"; shift 2 ;;
    --full) full=1; memory=1; shift ;;
    --memory) memory=1; shift ;;
    --smoke) smoke=1; shift ;;
    --no-build) do_build=0; shift ;;
    --no-plot) do_plot=0; shift ;;
    --strict) strict=--strict; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "compare_g.sh: unknown option '$1'" >&2; usage >&2; exit 2 ;;
  esac
done
out="${out:-$build/bench-results}"
if [[ $smoke == 1 ]]; then
  reps=1 min_time=0.01 seq=1024 full=0 memory=0
fi

# The tools, before minutes of benchmarks rather than after them.
missing=()
if [[ $do_build == 1 ]]; then
  for tool in cmake make c++; do command -v "$tool" >/dev/null || missing+=("$tool"); done
fi
command -v python3 >/dev/null || missing+=(python3)
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "compare_g.sh: missing ${missing[*]}. On Debian 12:" >&2
  echo "  apt-get install -y --no-install-recommends g++ cmake make libeigen3-dev catch2 libbenchmark-dev" \
    "nlohmann-json3-dev python3 python3-matplotlib" >&2
  exit 1
fi
# The first python3 that has matplotlib (a pyenv or venv python3 may not see the system's package).
plot_py=""
if [[ $do_plot == 1 ]]; then
  for py in python3 /usr/bin/python3; do
    if command -v "$py" >/dev/null && "$py" -c "import matplotlib" 2>/dev/null; then plot_py="$py"; break; fi
  done
  [[ -n "$plot_py" ]] || echo "NOTE: matplotlib is not installed, so there will be no plot" \
    "(apt-get install python3-matplotlib, or pip install matplotlib); the tables do not need it."
fi

if [[ $do_build == 1 ]]; then
  if [[ ! -f "$build/CMakeCache.txt" ]]; then
    echo "== configuring $build (Release, benchmarks only)"
    cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DGQA_BUILD_BENCHMARKS=ON -DGQA_BUILD_TESTS=OFF \
      -DGQA_BUILD_EXAMPLES=OFF -DGQA_BUILD_TOOLS=OFF >/dev/null
  elif ! grep -q '^GQA_BUILD_BENCHMARKS:BOOL=ON' "$build/CMakeCache.txt"; then
    cmake "$build" -DGQA_BUILD_BENCHMARKS=ON >/dev/null
  fi
  type="$(sed -n 's/^CMAKE_BUILD_TYPE:[A-Z]*=//p' "$build/CMakeCache.txt")"
  [[ "$type" == Release ]] || echo "WARNING: $build has CMAKE_BUILD_TYPE='$type', not Release: timings are not representative" >&2
  echo "== building bench_decode and bench_prefill in $build (log: $out/build.log)"
  mkdir -p "$out"
  cmake --build "$build" --target bench_decode bench_prefill -j "$(nproc 2>/dev/null || echo 2)" >"$out/build.log" 2>&1 ||
    { echo "compare_g.sh: the build failed, see $out/build.log" >&2; tail -20 "$out/build.log" >&2; exit 1; }
fi
decode="$build/bench/bench_decode"
prefill="$build/bench/bench_prefill"
for b in "$decode" "$prefill"; do
  [[ -x "$b" ]] || { echo "compare_g.sh: $b not found (build first, or drop --no-build)" >&2; exit 1; }
done
mkdir -p "$out"
rm -f "$out"/decode.json "$out"/decode_ref.json "$out"/prefill.json "$out"/prefill_ref.json "$out"/prefill_memory.json
# What report.py and plot.py name the machine by (Google Benchmark's JSON has no CPU model).
model="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo 2>/dev/null | head -1)"
printf '%s, %s CPUs\n' "${model:-unknown CPU}" "$(nproc 2>/dev/null || echo '?')" >"$out/machine.txt"

# run BINARY JSON_NAME REPS FILTER: one binary run, JSON to $out, console to $out/NAME.log.
run() {
  local bin="$1" name="$2" n="$3" filter="$4" start=$SECONDS
  printf '== %-16s %3d benchmarks x %d repetition(s) ... ' "$name" \
    "$("$bin" --benchmark_list_tests --benchmark_filter="$filter" | wc -l)" "$n"
  "$bin" --benchmark_filter="$filter" --benchmark_repetitions="$n" --benchmark_min_time="$min_time" \
    --benchmark_out="$out/$name.json" --benchmark_out_format=json >"$out/$name.log" 2>&1 ||
    { echo "failed, see $out/$name.log" >&2; tail -5 "$out/$name.log" >&2; exit 1; }
  echo "$((SECONDS - start)) s"
}

total_start=$SECONDS
echo "== load average before the runs: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '?')"
if [[ $smoke == 1 ]]; then
  run "$decode" decode 1 \
    "^(baseline/sgemm/.*|(baseline/stream_read|decode)/H:32/G:(32|8|1)/D:128/S:$seq/kv:(f32|bf16|f16|i8)/threads:[12])$"
  run "$prefill" prefill 1 "^(baseline/sgemm/.*|prefill/H:32/G:(32|8)/D:128/S:512/kv:f32/threads:[12]/causal:1)$"
else
  # Decode: all six G, f32, bf16, f16 and int8 caches, 1 and 2 threads, each with the stream read of its own
  # cache, and the sgemm; also the fp32 decode at S = 1024 that sits next to the reference.
  run "$decode" decode "$reps" \
    "^(baseline/sgemm/.*|(baseline/stream_read|decode)/H:32/G:[0-9]+/D:128/(S:$seq/kv:(f32|bf16|f16|i8)|S:1024/kv:f32)/threads:[12])$"
  # The naive reference (double; a second per call) runs once, at S = 1024.
  run "$decode" decode_ref 1 "^reference/decode/H:32/G:[0-9]+/D:128/S:1024/kv:f32/threads:1$"

  pg="(8|32)"
  [[ $full == 1 ]] && pg="[0-9]+"
  run "$prefill" prefill "$reps" \
    "^(baseline/sgemm/.*|prefill/H:32/G:$pg/D:128/S:4096/kv:f32/threads:[12]/causal:1|prefill/H:4/G:1/D:128/S:2048/kv:f32/threads:[12]/causal:1)$"
  run "$prefill" prefill_ref 1 "^reference/prefill/H:4/G:1/D:128/S:2048/kv:f32/threads:1/causal:1$"
  if [[ $memory == 1 ]]; then
    # Its own process, so that peak_rss_mb (the process's high-water mark) is this run's.
    run "$prefill" prefill_memory 1 "^prefill/H:32/G:8/D:128/S:32768/kv:f32/threads:2/causal:1$"
  fi
fi
echo "== benchmarks took $((SECONDS - total_start)) s; JSON in $out"
echo

status=0
jsons=()
for f in decode decode_ref prefill prefill_ref prefill_memory; do [[ -f "$out/$f.json" ]] && jsons+=("$out/$f.json"); done
python3 "$here/report.py" $strict $([[ $smoke == 1 ]] && echo --smoke) "${jsons[@]}" || status=$?

if [[ -n "$plot_py" ]]; then
  echo
  "$plot_py" "$here/plot.py" "$out/decode.json" -o "$out/decode_vs_G.png" || status=$?
fi
exit $status
