#!/usr/bin/env bash
# The GPU benchmark: analysis, verified selection, healing and perplexity on randomly initialised
# models of Llama-3-8B's shape (whole on the GPU, bfloat16) and Llama-3-70B's shape (streamed one
# block at a time from pinned CPU memory), no download. Prints per stage: seconds, tokens/s, peak
# device memory, peak RSS and the ratio to one plain forward pass; writes benchmarks/results/gpu.json.
#
#   bash benchmarks/gpu.sh [extra gpu_bench.py arguments, e.g. --shapes 8b]
#
# One prepared script, sized to finish within 10 minutes on one H200-class GPU (a hard limit of
# 570 s is enforced). Fails at once, with the reason, when there is no CUDA GPU. On a bare
# machine it installs the package first (pip install -e .), which needs torch with CUDA present.
set -euo pipefail

cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi

"$PY" - <<'PYEOF'
import sys
try:
    import torch
except ImportError:
    sys.exit("gpu.sh needs torch with CUDA: torch is not installed for this Python "
             "(install a CUDA build of torch, or set PYTHON=/path/to/python).")
if not torch.cuda.is_available():
    sys.exit(f"gpu.sh needs a CUDA GPU: torch {torch.__version__} sees none (torch.cuda.is_available() is "
             "False). Run it on a machine with an NVIDIA GPU and a CUDA build of torch.")
p = torch.cuda.get_device_properties(0)
print(f"torch {torch.__version__}, {p.name}, {p.total_memory / 2**30:.0f} GiB")
PYEOF

if ! "$PY" -c "import mi_prun, accelerate, safetensors" 2>/dev/null; then
    echo "mi_prun is not importable: installing it (pip install -e .)"
    "$PY" -m pip install --quiet -e .
fi

timeout 570 "$PY" benchmarks/gpu_bench.py --shapes 8b,70b --device cuda --out benchmarks/results/gpu.json "$@"
