#!/usr/bin/env bash
# GPU throughput check of the pretrain stage's training path (one script, run from anywhere).
#
# Runs on a bare GPU machine with torch, lightning, tokenizers, safetensors and numpy only:
# --no-tracking skips the MLflow variant, and the modules the benchmark imports
# (bigmodel_ops.pretraining.{data,lm_module,flops}, bigmodel_ops.trainer, model, shards) import
# neither mlflow nor pydantic.
#
# Targets (H200, bf16, torch.compile, flash SDPA, fused AdamW):
#   gpt2-124m causal, block 1024:  >= 579k tokens/s (nanoGPT's loop did 518k)
#   bert-base masked, block 128, batch 256:  >= 560k tokens/s (HF BertForMaskedLM did 468k)
# Each line of output ends with one JSON object: tokens/s of our stage (Lightning) and of the
# plain loop, their ratio, MFU vs 989 TFLOP/s, peak memory, data-wait fraction.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor-cache}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"

bench() { python benchmarks/pretrain_throughput.py --device cuda --no-tracking --steps 30 --warmup 10 --repeats 2 "$@" 2>/dev/null | tail -n 1; }

echo "gpt2-124m causal block 1024 batch 32";  bench --preset gpt2-124m --objective causal --block-size 1024 --batch-size 32
echo "gpt2-124m causal block 1024 batch 64";  bench --preset gpt2-124m --objective causal --block-size 1024 --batch-size 64
echo "bert-base masked block 128 batch 256";  bench --preset bert-base --objective masked --block-size 128 --batch-size 256 --num-workers 4
