#!/usr/bin/env bash
# One prepared GPU run (installs nothing from the network): a kernel-level probe, then SDXL 1024 and SD1.5 512,
# random weights of the real architectures, fewstep vs diffusers (as the LCM-LoRA blog runs it, and tuned), then
# fewstep with CUDA graphs and compiled (about 6 minutes on an H100).
# Usage, from the repo root: OUT=results-dir bash benchmarks/gpu.sh   (diffusers may come as wheels in .whl/)
set -uo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
timeout 120 python3 benchmarks/gpu_probe.py 2>&1 | tee "$OUT/probe.txt"
bench() { name=$1; shift; timeout "${LIMIT:-150}" python3 -m fewstep.cli bench --device cuda "$@" --out "$OUT/$name.json" 2>&1 | tee "$OUT/$name.txt"; }
bench sdxl --arch sdxl --runs 3 --modes lcm                                            # eager, vs diffusers
bench sdxl-graphs --arch sdxl --runs 3 --modes lcm --systems fewstep,diffusers-tuned --cuda-graphs
bench sdxl-graphs-qkv --arch sdxl --runs 3 --modes lcm --systems fewstep,diffusers-tuned --cuda-graphs --fused-qkv
LIMIT=240 bench sdxl-compiled --arch sdxl --runs 3 --modes lcm --systems fewstep,diffusers-seed --compile
bench sd15 --arch sd15 --runs 5 --modes lcm
