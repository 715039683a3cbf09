#!/usr/bin/env bash
# The GPU check, run on a lent GPU machine (never in CI): GPU tests, every PEFT method and
# both DP modes on CUDA, two ranks with CUDA tensors over gloo, and a throughput probe.
# Usage (device tool): bash tools/device_check.sh   (carry .whl: opacus/submitit wheels)
set -u
export PYTHONUNBUFFERED=1 OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, timm, opacus; print('torch', torch.__version__, 'timm', timm.__version__, 'opacus', opacus.__version__, torch.cuda.get_device_name())"
Q=configs/quickstart.yaml
T="run.progress=false fed.rounds=2 fed.local_epochs=1 model.pretrained=false"
echo "== pytest tests/test_gpu.py"
timeout 240 python3 -m pytest -q -x tests/test_gpu.py 2>&1 | tail -5
for m in full head bias adapter prompt lora; do
    echo "== $m on cuda"
    timeout 60 python3 -m fedpeft_hpc train $Q run.dir=/tmp/r_$m peft.method=$m comm.device=cuda $T 2>&1 | tail -1
done
echo "== DP-SGD (sample) on cuda, prompt"
timeout 90 python3 -m fedpeft_hpc train $Q run.dir=/tmp/dp_s peft.method=prompt privacy.mode=sample privacy.noise_multiplier=1.0 comm.device=cuda $T 2>&1 | tail -2
echo "== client-level DP on cuda"
timeout 60 python3 -m fedpeft_hpc train $Q run.dir=/tmp/dp_c privacy.mode=client privacy.noise_multiplier=0.5 comm.device=cuda $T 2>&1 | tail -1
echo "== 2 ranks, gloo, cuda tensors"
timeout 90 python3 -m torch.distributed.run --standalone --nproc_per_node=2 -m fedpeft_hpc train $Q run.dir=/tmp/r_2 peft.method=lora comm.device=cuda comm.backend=gloo $T 2>&1 | tail -2
echo "== throughput probe"
timeout 120 python3 tools/gpu_probe.py --model vit_base_patch16_224 --img 224 --batches 16,64,256 2>&1 | tee "$OUT/probe.txt"
