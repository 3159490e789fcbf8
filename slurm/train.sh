#!/bin/bash
# Train EoMT with plain sbatch (without the Hydra submitit launcher), on one node or several.
#
#   sbatch slurm/train.sh experiment=coco_panoptic_vit_l_640 dataset.root=/data/coco
#   sbatch --nodes=2 slurm/train.sh experiment=coco_panoptic_vit_g_640 dataset.root=/data/coco
#   sbatch -p gpu -A myproject --time=48:00:00 slurm/train.sh ...
#
# Arguments are train.py's Hydra overrides. Partition, account and QOS come from sbatch's own
# options (-p/-A/-q) or from SBATCH_PARTITION / SBATCH_ACCOUNT / SBATCH_QOS in the environment.
# One task per GPU: srun starts every rank and train.py reads its rank from SLURM's environment.
#
# Time limits and preemption: SLURM sends USR2 to every rank 5 minutes before the limit; train.py
# saves a checkpoint at the next step boundary and, because EOMT_REQUEUE=1, rank 0 runs
# `scontrol requeue`. The requeued job runs this script again with the same arguments, so it uses
# the same run directory (outputs/<name>) and resumes from the checkpoint (trainer.resume=auto).
# A job killed without warning (node failure) is requeued by SLURM (--requeue) and resumes from
# its last periodic checkpoint. The log file is appended to across requeues.
#
#SBATCH --job-name=eomt
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=16
#SBATCH --mem=256G
#SBATCH --time=24:00:00
#SBATCH --signal=USR2@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-.}"
export EOMT_REQUEUE=1
# srun does not inherit --cpus-per-task from sbatch (Slurm >= 22.05): data-loading workers need them.
if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
  export SRUN_CPUS_PER_TASK="${SLURM_CPUS_PER_TASK}"
fi
echo "[$(date)] job ${SLURM_JOB_ID:-?} (restart #${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-?}: $*"

# --kill-on-bad-exit: if one rank fails, stop the others instead of leaving them waiting in a collective.
srun --kill-on-bad-exit=1 "${EOMT_PYTHON:-python}" train.py "$@"
