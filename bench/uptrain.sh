#!/usr/bin/env bash
# bench/uptrain.sh -- the uptraining measurement on SmolLM2-135M (/work/models): pool G = 3 -> 1 with gqa-convert
# (each --method given), uptrain each with gqa-uptrain on the model-generated calibration ids, then perplexity with
# example_decoder on the fixed eval ids (bench/eval, the project's own prose) and on the model-generated held-out
# ids (bench/uptrain_data/heldout.ids), before and after, and on each --eval IDS_FILE. Prints one table row per
# method.
#
#   bench/uptrain.sh [--build DIR] [--models DIR] [--work DIR] [--steps N] [--lr LR] [--train T] [--target T]
#                    [--threads N] [--calibration IDS_FILE] [--eval IDS_FILE]... [--resume] [METHOD ...]
#
# --calibration replaces the model-generated calibration ids (e.g. bench/real_text.py's calibration.ids); each
# --eval adds a column pair (before, after) named after the file, e.g. real_text.py's eval-pydoc.ids,
# eval-licenses.ids and eval-man.ids for the real-text recovery table. --resume passes gqa-uptrain --resume, so a
# stopped run of this script continues where it was (the pooled checkpoint is then not written again if present).
#
# Defaults: build/ (configured; builds gqa-convert, gqa-uptrain, example_decoder), /work/models, /tmp/gqa-uptrain,
# the tool's --steps, --lr, --train and --target, 2 threads, methods mean first random. Calibration and held-out ids come from
# bench/uptrain_calibration.py (committed under bench/uptrain_data/). Timing runs with OMP_WAIT_POLICY=passive:
# on a shared machine, report the load (uptime) next to the wall and CPU times this prints.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
build="$here/../build" models=/work/models work=/tmp/gqa-uptrain threads=2 extra=()
methods=() evals=() resume=0
calib="$here/uptrain_data/calibration.ids"
while [ $# -gt 0 ]; do
  case "$1" in
    --build) build="$2"; shift 2 ;;
    --models) models="$2"; shift 2 ;;
    --work) work="$2"; shift 2 ;;
    --steps) extra+=(--steps "$2"); shift 2 ;;
    --lr) extra+=(--lr "$2"); shift 2 ;;
    --train) extra+=(--train "$2"); shift 2 ;;
    --target) extra+=(--target "$2"); shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --calibration) calib="$2"; shift 2 ;;
    --eval) evals+=("$2"); shift 2 ;;
    --resume) resume=1; extra+=(--resume); shift ;;
    -*) echo "uptrain.sh: unknown option $1" >&2; exit 2 ;;
    *) methods+=("$1"); shift ;;
  esac
done
[ ${#methods[@]} -gt 0 ] || methods=(mean first random)
export OMP_WAIT_POLICY=passive
cmake --build "$build" --target gqa-convert gqa-uptrain example_decoder -j2 > "$work.build.log" 2>&1 ||
  { cat "$work.build.log"; exit 1; }
mkdir -p "$work"
native="$models/smollm2-135m-hf"
for f in "$calib" ${evals[@]+"${evals[@]}"}; do [ -f "$f" ] || { echo "uptrain.sh: $f not found" >&2; exit 2; }; done
heldout="$here/uptrain_data/heldout.ids" eval="$here/eval/gqa_docs.ids"
ppl() { "$build/examples/example_decoder" "$1" perplexity --ids "$2" --context 512 --threads "$threads" | tail -1 | awk '{print $2}'; }
names="" native_extra=""
for f in ${evals[@]+"${evals[@]}"}; do
  n="$(basename "$f" .ids)"
  names="$names $n before | $n after |"
  native_extra="$native_extra, $n $(ppl "$native" "$f")"
done
echo "calibration: $calib"
echo "native: eval $(ppl "$native" "$eval"), held-out $(ppl "$native" "$heldout")$native_extra"
echo "| method | eval before | eval after | held-out before | held-out after |$names wall s | CPU s |"
for m in "${methods[@]}"; do
  pooled="$work/g1-$m" up="$work/g1-$m-uptrained"
  # With --resume the pooled checkpoint the saved progress was made from is kept (its digest is checked).
  [ "$resume" = 1 ] && [ -d "$pooled" ] ||
    "$build/examples/gqa-convert" "$native" "$pooled" --groups 1 --method "$m" --force --quiet
  "$build/examples/gqa-uptrain" "$native" "$pooled" "$up" --calibration "$calib" --threads "$threads" --force \
    "${extra[@]}" > "$work/uptrain-$m.log"
  times=$(tail -1 "$work/uptrain-$m.log" | sed -E 's/.*wall ([0-9.]+) s, CPU ([0-9.]+) s.*/\1 | \2/')
  cols=""
  for f in ${evals[@]+"${evals[@]}"}; do cols="$cols $(ppl "$pooled" "$f") | $(ppl "$up" "$f") |"; done
  echo "| $m | $(ppl "$pooled" "$eval") | $(ppl "$up" "$eval") | $(ppl "$pooled" "$heldout") | $(ppl "$up" "$heldout") |$cols $times |"
done
echo "load: $(uptime)"
