# Shared by train.sbatch and train-multinode.sbatch (sourced, not run). SLURM copies a job script to its
# spool directory, so the scripts find this file, the configs and the package through the repository
# root: $DIST_TRAIN_ROOT, else the directory sbatch was called from.
#
# Environment a job reads (all optional except where a GPU count cannot be found):
#   DIST_TRAIN_ACCELERATE_CONFIG  accelerate YAML (default launch/accelerate/zero2-fp16.yaml;
#                                 multi-node: launch/accelerate/multi-node.yaml)
#   DIST_TRAIN_PROCS_PER_NODE     processes per node (default: the GPUs SLURM allocated per node)
#   DIST_TRAIN_MAX_RESTARTS       torchrun restarts after a rank fails (default 1)
#   DIST_TRAIN_PYTHON             interpreter with dist_train installed (default $VIRTUAL_ENV/bin/python,
#                                 else ROOT/.venv/bin/python, else python3)
#   DIST_TRAIN_STOP_FILE          file whose existence asks the ranks to stop (default: per job, in /tmp)
#   MASTER_PORT                   rendezvous port (default 15000 + job id % 10000)

dt_log() { echo "dist-train job: $*"; }
dt_die() {
    echo "dist-train job: error: $*" >&2
    exit 2
}

# dt_prepare NNODES TRAINER_FLAGS...: checks everything and sets PY, ACCELERATE_CONFIG, PROCS_PER_NODE,
# WORLD_SIZE, MASTER_ADDR, MASTER_PORT, MAX_RESTARTS, RUN_DIR, JOB_REF, DIST_TRAIN_STOP_FILE.
dt_prepare() {
    local nnodes=$1 head
    shift
    cd "$ROOT" || dt_die "cannot enter the repository root $ROOT"
    [ -d "$ROOT/launch/slurm" ] || dt_die "$ROOT is not the dist_train repository; submit from its root or set DIST_TRAIN_ROOT"
    PROCS_PER_NODE=${DIST_TRAIN_PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
    [ -n "$PROCS_PER_NODE" ] || dt_die "no GPUs in this allocation: submit with --gpus-per-node=N (one process per GPU), or set DIST_TRAIN_PROCS_PER_NODE=N to run N processes per node (CPU)"
    [[ "$PROCS_PER_NODE" =~ ^[1-9][0-9]*$ ]] || dt_die "processes per node must be a positive integer, got '$PROCS_PER_NODE'"
    WORLD_SIZE=$((nnodes * PROCS_PER_NODE))
    if [ -n "${DIST_TRAIN_PYTHON:-}" ]; then PY=$DIST_TRAIN_PYTHON
    elif [ -n "${VIRTUAL_ENV:-}" ]; then PY=$VIRTUAL_ENV/bin/python
    elif [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python
    else PY=$(command -v python3) || dt_die "no python3; set DIST_TRAIN_PYTHON"
    fi
    "$PY" -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('dist_train') and u.find_spec('accelerate')))" 2>/dev/null \
        || dt_die "$PY cannot import dist_train and accelerate; set DIST_TRAIN_PYTHON to the project's interpreter (bash launch/setup.sh makes .venv)"
    MAX_RESTARTS=${DIST_TRAIN_MAX_RESTARTS:-1}

    RUN_DIR=$("$PY" -m launch.slurm.preflight "$ACCELERATE_CONFIG" "$WORLD_SIZE" "$@") || exit 2

    # The head node's address as SLURM reaches it (NodeAddr; on most clusters the host name itself).
    head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
    MASTER_ADDR=$(scontrol show node "$head" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
    MASTER_ADDR=${MASTER_ADDR:-$head}
    MASTER_PORT=${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 10000))}
    JOB_REF=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
    JOB_REF=${JOB_REF:-$SLURM_JOB_ID}
    # Ranks on this (the batch) node see it; they share the stop decision with all others by all-reduce.
    export DIST_TRAIN_STOP_FILE=${DIST_TRAIN_STOP_FILE:-${TMPDIR:-/tmp}/dist-train-stop.$SLURM_JOB_ID}
    export MASTER_ADDR MASTER_PORT
    # Elastic restarts: with the rendezvous store shared between torchrun and the workers (the default),
    # restarted workers can read the dead ranks' addresses and fail to connect (pytorch/pytorch#135712).
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    export PET_RDZV_ID=${PET_RDZV_ID:-$SLURM_JOB_ID} # torchrun's --rdzv-id: this job's rendezvous only

    dt_log "job $JOB_REF (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: $nnodes node(s) x $PROCS_PER_NODE process(es)," \
        "accelerate config $ACCELERATE_CONFIG, rendezvous $MASTER_ADDR:$MASTER_PORT, run dir $RUN_DIR"
}

# The batch shell gets SIGUSR1 (--signal=B:USR1@SECONDS) before the time limit or on preemption. It does
# not signal the launcher (torchrun dies on SIGUSR1): it creates the stop file, the ranks agree to stop
# after the same optimizer step, save a complete checkpoint, write RUN_DIR/PREEMPTED and exit 0.
dt_on_usr1() {
    dt_log "SIGUSR1: asking every rank to stop after its current step and checkpoint"
    STOP_REQUESTED=1
    touch "$DIST_TRAIN_STOP_FILE"
}

# dt_run COMMAND...: runs the job step in the background (a trap cannot run while bash waits for a
# foreground command), then requeues the job if the trainer stopped early on request.
dt_run() {
    local pid rc
    STOP_REQUESTED=0
    rm -f "$RUN_DIR/PREEMPTED"
    trap dt_on_usr1 USR1
    "$@" &
    pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        if [ "$STOP_REQUESTED" = 0 ]; then
            wait "$pid" # returns when the step ends or the trap has run
        else
            # A trainer that was still starting clears stale stop files: keep the request standing
            # until the ranks have acted on it.
            [ -e "$DIST_TRAIN_STOP_FILE" ] || [ -e "$RUN_DIR/PREEMPTED" ] || touch "$DIST_TRAIN_STOP_FILE"
            sleep 2
        fi
    done
    wait "$pid"
    rc=$?
    trap - USR1
    if [ -e "$RUN_DIR/PREEMPTED" ] && [ "$rc" -eq 0 ]; then
        dt_log "stopped at step $(cat "$RUN_DIR/PREEMPTED") with a complete checkpoint; requeueing job $JOB_REF"
        scontrol requeue "$JOB_REF" || dt_die "scontrol requeue $JOB_REF failed; resubmit the job (it resumes from the latest checkpoint)"
        exit 0
    fi
    rm -f "$DIST_TRAIN_STOP_FILE"
    if [ "$rc" -eq 0 ]; then
        dt_log "finished: $(cat "$RUN_DIR/DONE" 2>/dev/null | sed 's/^/step /')"
    else
        dt_log "the training step failed with exit code $rc"
    fi
    exit "$rc"
}
