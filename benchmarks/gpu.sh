#!/usr/bin/env bash
# The speed benchmark on a GPU with a randomly initialised model of Llama-2-7B's shape.
#
#   bash benchmarks/gpu.sh [extra speed.py arguments]
#
# Timing needs no trained weights: speed.py --model random-llama2-7b builds the model from a
# LlamaConfig (hidden 4096, 32 layers, 32 heads, intermediate 11008, vocab 32000) directly on the
# GPU in bfloat16 and feeds random token ids, so nothing is downloaded. Prints the capture's tokens
# per second, the capture / forward ratio, the span-matrix times (0.1B/1B/7B shapes and the growth
# law) and the capture's peak GPU memory against calibration size. Writes
# benchmarks/results/speed-gpu.json (override with --out). On a bare machine it installs the
# package first (pip install -e .), which needs torch with CUDA already present.
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import mi_prun" 2>/dev/null; then
    echo "mi_prun is not importable: installing it (pip install -e .)"
    "$PY" -m pip install --quiet -e .
fi
"$PY" - <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"gpu.sh needs a CUDA GPU; torch {torch.__version__} sees none")
print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, "
      f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
EOF

OUT=benchmarks/results/speed-gpu.json
"$PY" benchmarks/speed.py --model random-llama2-7b --device cuda --dtype bfloat16 \
    --sections capture,span,memory --out "$OUT" "$@"

"$PY" - "$OUT" "$@" <<'EOF'
import json, sys
path = sys.argv[1]
for i, a in enumerate(sys.argv[2:]):
    if a == "--out":
        path = sys.argv[2 + i + 1]
r = json.load(open(path))
c = r["capture_vs_forward"]
print(f"\n== {r['model']} on {r['environment'].get('gpu', r['environment']['device'])} ==")
print(f"capture: {c['capture_tokens_per_s']:,.0f} tokens/s "
      f"(forward {c['forward_tokens_per_s']:,.0f} tokens/s; capture/forward {c['median_ratio_capture_over_forward']:.3f})")
for row in r["span_scaling"]["model_shapes"]:
    print(f"span matrix {row['shape']}, m={row['m']}: {row['seconds']:.3f} s")
print("growth law: " + ", ".join(f"t ~ {k}^{v:.2f}" for k, v in r["span_scaling"]["growth_law"].items()))
m = r["memory"]
print("capture peak GPU memory: " + ", ".join(
    f"N={row['n_samples']}: {row['peak_increase_bytes'] / 2**20:.0f} MiB" for row in m["rows"]))
EOF
