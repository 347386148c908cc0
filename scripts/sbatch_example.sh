#!/bin/bash
# Submit one ddrun run by hand on SLURM, preemption- and time-limit-safe:
#   sbatch scripts/sbatch_example.sh method=dm dataset=cifar10 ipc=10 seed=0
# (sweeps are easier with the Hydra launcher: ddrun distill -m hydra/launcher=slurm method=dm,dc ipc=1,10,50)
#
# How it survives: SLURM sends USR1 to this script 120 s before the time limit (--signal=B:USR1@120); the trap
# forwards it to ddrun, which saves checkpoint.pt at the next iteration boundary (at once during an evaluation) and
# exits; the script then requeues the job. The requeued job keeps its job id, so it runs in the same run directory
# and ddrun resumes from the checkpoint. On preemption SLURM sends SIGTERM, which ddrun handles the same way; with
# PreemptMode=REQUEUE the job comes back by itself. Edit the #SBATCH lines for your cluster.
#SBATCH --job-name=ddrun
#SBATCH --partition=gpu
##SBATCH --account=YOUR_ACCOUNT
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -u
COMMAND=${DDRUN_COMMAND:-distill}                                  # or: evaluate, buffer
RUN_DIR=${RUN_DIR:-outputs/slurm/${SLURM_JOB_NAME:-ddrun}_${SLURM_JOB_ID:?not inside a SLURM job}}
# source .venv/bin/activate                                        # if ddrun is not on PATH

echo "$(date '+%F %T') job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on $(hostname): ddrun $COMMAND $* -> $RUN_DIR"
ddrun "$COMMAND" "$@" hydra.run.dir="$RUN_DIR" &
PID=$!

requeue() {
    echo "$(date '+%F %T') time limit or preemption near: asking ddrun (pid $PID) to checkpoint"
    kill -USR1 "$PID" 2>/dev/null
    wait "$PID"
    echo "$(date '+%F %T') ddrun stopped (status $?); requeueing job ${SLURM_JOB_ID}"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
}
trap requeue USR1 TERM

wait "$PID"
exit $?
