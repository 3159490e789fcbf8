#!/usr/bin/env bash
# Launch every ablation of the paper onto SLURM, one sweep after the other (each launching command
# blocks until its jobs end, so run this inside tmux/screen). Extra arguments go to every sweep,
# e.g. hydra.launcher.partition=gpu dataset.root=/data/coco.
set -euo pipefail
cd "$(dirname "$0")/.."
for sweep in annealing num_blocks removal components model_size pretraining; do
  python train.py -m "+sweep=${sweep}" hydra/launcher=slurm "$@"
  python -m eomt.report "$(ls -dt outputs/multirun/${sweep}_* | head -n 1)" \
    || echo "report of the ${sweep} sweep failed (see above); its runs are still in outputs/multirun" >&2
done
