#!/usr/bin/env bash
# The README's first command installs only `pip install -e .`: no test extras, so no torch and none of what torch
# brings in. The test run above has all of them, so this checks, in a venv with the core install only, the path the
# main job starts with: fetch + convert SmolLM2-135M-Instruct, its chat template, one greedy answer.
set -euo pipefail
cd "$(dirname "$0")/.."
d=$(mktemp -d)
trap 'rm -rf "$d"' EXIT
python -m venv "$d/venv"
py="$d/venv/bin/python"
"$py" -m pip install -q -e .
if "$py" -c "import torch" 2>/dev/null; then echo "core install smoke: torch is installed, the check means nothing" >&2; exit 1; fi
"$py" -m iopo_jax.tools.fetch_model smollm2-135m-instruct --out "$d/smollm2" --quiet
printf '{"id": "q", "prompt": "What is the capital of France? Answer in one short sentence."}\n' > "$d/in.jsonl"
"$py" -m iopo_jax.sampling.generate --model_dir="$d/smollm2" --input="$d/in.jsonl" --output="$d/out.jsonl" \
    --max_new_tokens=24 --temperature=0 --batch_size=1 --noprogress
grep -q "Paris" "$d/out.jsonl" || { echo "core install smoke: no 'Paris' in $(cat "$d/out.jsonl")" >&2; exit 1; }
echo "core install smoke: ok ($(cat "$d/out.jsonl"))"
