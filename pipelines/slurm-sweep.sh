#!/usr/bin/env bash
# Train the runs of one sweep grid with M Slurm workers, then write the report.
#
# A template: documented, `bash -n`-checked, not run in CI. Copy it and adapt
# the #SBATCH lines to your cluster.
#
#   # on the login node, from the repository (binaries built with
#   # `cargo build --release`, the cache extracted, e.g. by slurm-extract.sh):
#   CACHE=/shared/caches/rt-cache BACKBONE=/shared/backbones/all-MiniLM-L6-v2 \
#   GRID=/shared/grids/rt-grid.json RUNS=/shared/runs/rt M=8 JOBS=2 \
#   pipelines/slurm-sweep.sh submit
#
# `submit` checks the inputs (`sherl-fit sweep --dry-run` expands the grid
# and reads the cache's manifest, writing nothing), then queues two jobs:
#   1. a job array of M tasks: task I runs
#        sherl-fit sweep --cache $CACHE --backbone $BACKBONE --grid $GRID \
#          --out $RUNS --worker I/M --jobs $JOBS [--device $DEVICE]
#      training runs k with k % M == I of the expanded grid (the grid's order
#      is deterministic, so every task computes the same partition), all of
#      them into the one shared $RUNS directory;
#   2. a report job, started when every array task has ended, however it
#      ended (--dependency=afterany), running
#        sherl-fit report $RUNS
#      (files in $RUNS/report, the table in its output file).
#
# Why afterany, not afterok: a sweep task exits 1 as soon as one of its runs
# stopped with an error (error.json), and a task may hit its time limit;
# with afterok one failed run of many would cancel the report of all the
# others. The report only reads finished runs (summary.json) and lists the
# rest as skipped, so it is always safe to write; read the array's state
# (sacct -j ARRAY_ID) to see whether anything failed, fix it, re-submit.
#
# Every step can be re-run; re-submit the whole thing after a failure and
# only unfinished runs are trained:
# - a run with summary.json is finished and skipped;
# - a run with error.json (it stopped with an error) is skipped too, unless
#   SWEEP_ARGS=--retry-failed;
# - a run that was killed (node failure, time limit, scancel) has neither:
#   it is trained again from its first epoch (sherl-fit run clears its
#   partial metrics.jsonl and weights first);
# - a run another process is training holds its lock (RUNS/<run id>/.lock,
#   an flock released when its holder dies): a second worker does not start
#   it, trains the rest of its part, then waits for that lock and takes the
#   run over only if its holder died without finishing. So a requeued task
#   running next to its old self, or two submissions at once, never train
#   one run twice.
#
# Environment (read at submit time and exported to the jobs; sbatch's default
# --export=ALL passes them on):
#   CACHE       the feature cache (holds manifest.json)                   [required]
#   BACKBONE    backbone directory the cache was made from                [required]
#   GRID        grid file, JSON (see `sherl-fit sweep --help`)             [required]
#   RUNS        directory of the run directories, shared by all workers   [required]
#   M           number of workers (array tasks)                           [default 4]
#   JOBS        runs at once in each worker (--jobs); the task's cores
#               are divided among them                                    [default 1]
#   DEVICE      --device of every run: cpu, cuda, cuda:N or auto          [default: sherl-fit's]
#   SWEEP_ARGS  more `sherl-fit sweep` flags, split on whitespace, e.g.
#               "--retry-failed" or "-v"                                   [default none]
#   SHERL_BIN   directory holding sherl-fit                               [default <repo>/target/release, or CARGO_TARGET_DIR/release]
# Slurm's own input variables choose resources without editing this file
# (they override the #SBATCH lines below; command-line options override both):
#   SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_TIMELIMIT, SBATCH_GRES (e.g. gpu:1), ...
#
# Notes:
# - Runs are the unit of work: make M at most the number of runs the grid
#   expands to (submit prints it); workers beyond it have nothing to do.
#   A worker's runs train one after another (JOBS=1) or JOBS at a time.
# - Changing M between submissions is safe (finished runs are skipped by
#   run id, the lock keeps workers apart); only the balance changes.
# - CACHE, GRID and RUNS must be on a filesystem every node sees, and RUNS
#   on one where flock(2) locks hold across nodes (NFSv4, NFSv3 with lockd,
#   GPFS, Lustre mounted with -o flock; not Lustre's -o localflock). Where
#   flock is refused (Lustre's default), runs fail on RUNS/<run id>/.lock.
# - Each sweep task also writes RUNS/report when it ends, covering what was
#   finished then; the report job writes it again once all have ended.
#
#SBATCH --job-name=sherl-sweep
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=4
#SBATCH --mem=8G
#SBATCH --time=04:00:00
#SBATCH --output=sherl-sweep-%A_%a.out
set -euo pipefail

die() { echo "slurm-sweep: error: $*" >&2; exit 2; }
say() { echo "slurm-sweep: $*" >&2; }

M="${M:-4}"
JOBS="${JOBS:-1}"
DEVICE="${DEVICE:-}"
SWEEP_ARGS="${SWEEP_ARGS:-}"
SHERL_BIN="${SHERL_BIN:-}"

check_env() {
    [ -n "${CACHE:-}" ] || die "set CACHE to the feature cache"
    [ -n "${BACKBONE:-}" ] || die "set BACKBONE to the backbone directory the cache was made from"
    [ -n "${GRID:-}" ] || die "set GRID to the grid file"
    [ -n "${RUNS:-}" ] || die "set RUNS to the directory of the run directories"
    [[ "$M" =~ ^[1-9][0-9]*$ ]] || die "M must be a positive integer, not '$M'"
    [[ "$JOBS" =~ ^[1-9][0-9]*$ ]] || die "JOBS must be a positive integer, not '$JOBS'"
    [ -x "$SHERL_BIN/sherl-fit" ] || die "no sherl-fit in '$SHERL_BIN' (cargo build --release, or set SHERL_BIN)"
}

# The `sherl-fit sweep` flags every worker shares, in SWEEP_FLAGS.
sweep_flags() {
    local extra=()
    read -r -a extra <<<"$SWEEP_ARGS"
    SWEEP_FLAGS=(--cache "$CACHE" --backbone "$BACKBONE" --grid "$GRID" --out "$RUNS")
    if [ -n "$DEVICE" ]; then SWEEP_FLAGS+=(--device "$DEVICE"); fi
    SWEEP_FLAGS+=(${extra[@]+"${extra[@]}"})
}

# submit: runs on the login node; queues the array and the report.
submit() {
    # Inside a job, $0 is Slurm's spooled copy of this script: resolve the
    # repository's binaries now and pass them on.
    if [ -z "$SHERL_BIN" ]; then
        . "$(dirname "$0")/target-dir.sh"
        SHERL_BIN="$(cd "$(dirname "$0")/.." && sherl_release_dir)"
    fi
    check_env
    [ -f "$CACHE/manifest.json" ] || die "$CACHE is not a finished cache (no manifest.json)"
    [ -f "$GRID" ] || die "grid file $GRID not found"
    command -v sbatch >/dev/null || die "sbatch not found (run this on a Slurm login node)"
    # Expand the grid once here, so a bad grid or cache fails now rather
    # than in M tasks; this writes nothing.
    local plan runs
    sweep_flags
    plan="$("$SHERL_BIN/sherl-fit" -q sweep "${SWEEP_FLAGS[@]}" --dry-run)" \
        || die "sherl-fit sweep --dry-run refused the settings (see above)"
    runs="$(grep -c '"run_id"' <<<"$plan" || true)"
    if [ "$M" -gt "$runs" ]; then
        say "warning: $M workers for $runs runs: workers $runs..$((M - 1)) have nothing to do"
    fi
    mkdir -p "$RUNS"
    export CACHE BACKBONE GRID RUNS M JOBS DEVICE SWEEP_ARGS SHERL_BIN
    local script array_id report_id
    script="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
    array_id="$(sbatch --parsable --array="0-$((M - 1))" "$script" worker)"
    array_id="${array_id%%;*}" # --parsable prints "id" or "id;cluster"
    report_id="$(sbatch --parsable --job-name=sherl-sweep-report \
        --dependency="afterany:$array_id" \
        --cpus-per-task=1 --output="sherl-sweep-report-%j.out" "$script" report)"
    say "queued workers $array_id (array 0-$((M - 1)), $runs runs) and report ${report_id%%;*} -> $RUNS"
    echo "$array_id ${report_id%%;*}"
}

# worker: one array task, worker I = SLURM_ARRAY_TASK_ID of M.
worker() {
    check_env
    local i="${SLURM_ARRAY_TASK_ID:?worker runs as a Slurm array task}"
    sweep_flags
    mkdir -p "$RUNS"
    say "worker $i/$M on $(hostname): $RUNS"
    # exec: Slurm's signals (scancel, time limit) reach the sweep, whose
    # run processes stop when it is gone.
    exec "$SHERL_BIN/sherl-fit" --no-progress sweep "${SWEEP_FLAGS[@]}" \
        --worker "$i/$M" --jobs "$JOBS"
}

# report: after every worker ended.
report() {
    check_env
    "$SHERL_BIN/sherl-fit" --no-progress report "$RUNS"
}

case "${1:-}" in
    submit) submit ;;
    worker) worker ;;
    report) report ;;
    *)
        echo "usage: pipelines/slurm-sweep.sh submit|worker|report (see the comments at the top)" >&2
        exit 2
        ;;
esac
