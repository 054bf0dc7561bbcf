#!/usr/bin/env bash
# One prepared GPU run (installs nothing from the network): SD1.5 512 and SDXL 1024, random weights of the real
# architectures, fewstep vs diffusers (as the LCM-LoRA blog runs it, and tuned), then fewstep compiled.
# Usage, from the repo root: OUT=results-dir bash benchmarks/gpu.sh   (diffusers may come as wheels in .whl/)
set -uo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
bench() { name=$1; shift; timeout "${LIMIT:-170}" python3 -m fewstep.cli bench --device cuda "$@" --out "$OUT/$name.json" 2>&1 | tee "$OUT/$name.txt"; }
bench sd15 --arch sd15 --runs 5
bench sdxl --arch sdxl --runs 3
bench sdxl-batch --arch sdxl --runs 2 --modes lcm --systems fewstep,diffusers-tuned --batch 1,4
LIMIT=240 bench sdxl-compiled --arch sdxl --runs 3 --modes lcm --systems fewstep,diffusers-tuned --compile
