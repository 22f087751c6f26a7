#!/usr/bin/env bash
# Multi-node pretraining with torchrun (no cluster manager): run this same script on every node.
#
#   node 0:  MASTER_ADDR=10.0.0.1 NNODES=2 NODE_RANK=0 NPROC_PER_NODE=8 deploy/torchrun.sh
#   node 1:  MASTER_ADDR=10.0.0.1 NNODES=2 NODE_RANK=1 NPROC_PER_NODE=8 deploy/torchrun.sh
#
# torchrun starts NPROC_PER_NODE processes on this node and gives each RANK, LOCAL_RANK,
# WORLD_SIZE, GROUP_RANK, MASTER_ADDR and MASTER_PORT. Lightning detects them
# (TorchElasticEnvironment: it launches no processes of its own) and checks that
# devices x num_nodes of the Trainer equals WORLD_SIZE. So the active params profile MUST say:
#
#   profiles.<profile>.devices:   $NPROC_PER_NODE   (processes = GPUs per node; on CPU: processes)
#   profiles.<profile>.num_nodes: $NNODES
#   profiles.<profile>.strategy:  ddp
#
# This script refuses to start when they differ (the params are validated first, on every node,
# with `bigmodel-ops validate`). Every node needs the same code, params.yaml and
# outputs/tokenizer + outputs/shards (`dvc pull` or a shared filesystem), and the same
# MLFLOW_TRACKING_URI: only global rank 0 opens the MLflow run, writes checkpoints, the exported
# model and outputs/pretrain. Checkpoints go to outputs/pretrain/checkpoints on node 0: put outputs/ on a
# shared filesystem (or keep node 0 fixed) so that a rerun resumes.
#
# Environment (defaults: one node, every visible GPU, or 2 CPU processes without a GPU):
#   MASTER_ADDR     address of node 0, reachable from every node       (default 127.0.0.1)
#   MASTER_PORT     a free TCP port on node 0                           (default 29500)
#   NNODES          number of nodes                                     (default 1)
#   NODE_RANK       this node's index, 0 .. NNODES-1                    (default 0)
#   NPROC_PER_NODE  processes on this node = profiles.<p>.devices       (default: GPU count, or 2)
#   PARAMS          params file                                         (default params.yaml)
set -euo pipefail

MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE="$(python -c 'import torch; print(torch.cuda.device_count() or 2)')"
fi
PARAMS="${PARAMS:-params.yaml}"
export MASTER_ADDR MASTER_PORT NNODES NODE_RANK NPROC_PER_NODE

# The layout torchrun starts must be the layout the params ask Lightning for.
python - "$PARAMS" "$NPROC_PER_NODE" "$NNODES" <<'PY'
import sys

from bigmodel_ops.config import load_params

params_file, nproc, nnodes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sizing = load_params(params_file).sizing
want = {"devices": nproc, "num_nodes": nnodes, "strategy": "ddp"}
have = {"devices": sizing.devices, "num_nodes": sizing.num_nodes, "strategy": sizing.strategy}
if have != want:
    sys.exit(
        f"deploy/torchrun.sh: {params_file} has {have} but torchrun starts {want} "
        f"(NPROC_PER_NODE={nproc}, NNODES={nnodes}): set profiles.<profile>.devices / num_nodes / "
        "strategy to match"
    )
PY

# OMP threads per process: the CPU cores of this node shared by its processes.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / NPROC_PER_NODE > 0 ? $(nproc) / NPROC_PER_NODE : 1 ))}"

exec torchrun \
    --nnodes="$NNODES" \
    --node_rank="$NODE_RANK" \
    --nproc_per_node="$NPROC_PER_NODE" \
    --master_addr="$MASTER_ADDR" \
    --master_port="$MASTER_PORT" \
    -m bigmodel_ops.cli pretrain --params "$PARAMS" --quiet
