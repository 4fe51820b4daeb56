#!/usr/bin/env bash
# The method ladder on every GPU of one machine: one process per GPU, each with its own shard
# (--shard auto reads RANK and WORLD_SIZE, set by the launcher; each process takes the GPU of its
# LOCAL_RANK), then one merged table. The shards share nothing while running, so no
# torch.distributed set-up is needed; `accelerate launch` (or `torchrun`) only starts them.
#
#   bash scripts/cluster/reproduce_multi_gpu.sh            # all GPUs, budget gpu
#   NGPUS=2 BUDGET=laptop bash scripts/cluster/reproduce_multi_gpu.sh
#   LAUNCHER=torchrun bash scripts/cluster/reproduce_multi_gpu.sh   # without accelerate
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
NGPUS="${NGPUS:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
BUDGET="${BUDGET:-gpu}"
MODEL="${MODEL:-gemma-3-270m}"
if [[ "${LAUNCHER:-accelerate}" == torchrun ]]; then  # what `accelerate launch --multi_gpu` runs underneath
  LAUNCH=(torchrun --standalone --nproc_per_node "$NGPUS")
else
  LAUNCH=(accelerate launch --num_processes "$NGPUS" --num_machines 1 --mixed_precision no --dynamo_backend no)
  if [[ "$NGPUS" -gt 1 ]]; then LAUNCH+=(--multi_gpu); fi
fi
OUT="results/reproduce-paper-$BUDGET.csv"
"${LAUNCH[@]}" -m course_lib reproduce --model "$MODEL" --budget "$BUDGET" --shard auto --out "$OUT"
if [[ "$NGPUS" -gt 1 ]]; then  # each rank wrote ...-shard<rank>of<NGPUS>.csv
  python -m course_lib merge results/reproduce-paper-"$BUDGET"-shard*of"$NGPUS".csv --out "$OUT"
fi
