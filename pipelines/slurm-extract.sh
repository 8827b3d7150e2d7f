#!/usr/bin/env bash
# Extract one feature cache with N Slurm workers, then merge the parts.
#
# A template: documented, `bash -n`-checked, not run in CI. Copy it and adapt
# the #SBATCH lines to your cluster.
#
#   # on the login node, from the repository (binaries built with
#   # `cargo build --release`, assets fetched, backbone exported to ONNX):
#   BACKBONE=/shared/backbones/all-MiniLM-L6-v2 \
#   CACHE=/shared/caches/rt-cache N=8 \
#   DATA_ARGS="--data /shared/data/rt.csv.bz2 --label-column category --labels fresh,rotten --split train=0.8,valid=0.1,test=0.1 --group-column movie_name" \
#   pipelines/slurm-extract.sh submit
#
# `submit` queues two jobs:
#   1. a job array of N tasks: task I runs
#        sherl-extract run ... --shard-of I/N --out $PARTS/part-I --resume
#      writing the shards k with k % N == I and $PARTS/part-I/manifest.part.json;
#   2. a merge job, started only when every array task succeeded
#      (--dependency=afterok, cancelled if one fails), running
#        sherl-cache merge $PARTS/part-* --out $CACHE
#        sherl-cache verify $CACHE
#
# Every step can be re-run: a task whose part is finished exits at once, a
# killed task resumes its part (`--resume` keeps sealed shards), and a merge
# whose cache already has manifest.json does nothing. Re-submit the whole
# thing after fixing a failure; only missing work is redone.
#
# Environment (read at submit time and exported to the jobs; sbatch's default
# --export=ALL passes them on):
#   BACKBONE      backbone directory (tokenizer.json, config.json, model.onnx)  [required]
#   CACHE         the final cache directory (must not exist yet)                [required]
#   DATA_ARGS     dataset flags of `sherl-extract run`, split on whitespace
#                 (no paths with spaces)                                       [required]
#   N             number of workers (array tasks)                              [default 4]
#   PARTS         directory of the worker parts                                [default $CACHE.parts]
#   EXTRACT_ARGS  more `sherl-extract run` flags, identical for every worker, e.g.
#                 "--dtype f16 --late-layers 1 --examples-per-shard 2048"      [default none]
#   MODEL         ONNX model, if not $BACKBONE/model.onnx                      [optional]
#   DEVICE        --device of every worker: cpu, cuda, cuda:N or auto         [default auto]
#   SHERL_BIN     directory holding sherl-extract and sherl-cache             [default <repo>/target/release, or CARGO_TARGET_DIR/release]
#   ORT_DYLIB_PATH / SHERL_ASSETS   where the binaries find ONNX Runtime (docs/usage.md, "Assets")
# Slurm's own input variables choose resources without editing this file
# (they override the #SBATCH lines below; command-line options override both):
#   SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_TIMELIMIT, SBATCH_GRES (e.g. gpu:1), ...
#
# Notes:
# - Every worker reads and tokenizes the whole dataset (the cache order is
#   global: split, then length), then runs the backbone only over its shards.
#   Shards are the unit of work: make N at most the number of shards,
#   ceil(examples / examples_per_shard); workers beyond that write empty parts.
# - All workers must run with identical flags and inputs: `sherl-cache merge`
#   refuses parts whose settings_hash differs. The hash does not cover the
#   ONNX Runtime version or the device, so give every task the same resources
#   (all CPU or all GPU) for bit-consistent values across shards.
# - Workers need separate --out directories (sherl takes no lock); the parts
#   and the cache must be on a filesystem every node sees. The merge hard-links
#   shards when PARTS and CACHE are on the same filesystem (else copies them);
#   delete $PARTS after the merge if you like, never modify it.
#
#SBATCH --job-name=sherl-extract
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=16G
#SBATCH --time=04:00:00
#SBATCH --output=sherl-extract-%A_%a.out
set -euo pipefail

die() { echo "slurm-extract: error: $*" >&2; exit 2; }
say() { echo "slurm-extract: $*" >&2; }

N="${N:-4}"
DEVICE="${DEVICE:-auto}"
EXTRACT_ARGS="${EXTRACT_ARGS:-}"
MODEL="${MODEL:-}"
SHERL_BIN="${SHERL_BIN:-}"

check_env() {
    [ -n "${BACKBONE:-}" ] || die "set BACKBONE to the backbone directory"
    [ -n "${CACHE:-}" ] || die "set CACHE to the cache directory to create"
    [ -n "${DATA_ARGS:-}" ] || die "set DATA_ARGS to the dataset flags (e.g. \"--data FILE ...\")"
    [[ "$N" =~ ^[1-9][0-9]*$ ]] || die "N must be a positive integer, not '$N'"
    PARTS="${PARTS:-$CACHE.parts}"
    if [ ! -x "$SHERL_BIN/sherl-extract" ] || [ ! -x "$SHERL_BIN/sherl-cache" ]; then
        die "no sherl binaries in '$SHERL_BIN' (cargo build --release, or set SHERL_BIN)"
    fi
}

# submit: runs on the login node; queues the array and the merge.
submit() {
    # Inside a job, $0 is Slurm's spooled copy of this script: resolve the
    # repository's binaries now and pass them on.
    if [ -z "$SHERL_BIN" ]; then
        . "$(dirname "$0")/target-dir.sh"
        SHERL_BIN="$(cd "$(dirname "$0")/.." && sherl_release_dir)"
    fi
    check_env
    local model="${MODEL:-$BACKBONE/model.onnx}"
    [ -f "$model" ] || die "$model not found: export it once first (sherl-extract export-onnx --backbone $BACKBONE)"
    if [ -e "$CACHE/manifest.json" ]; then die "$CACHE is already a complete cache"; fi
    command -v sbatch >/dev/null || die "sbatch not found (run this on a Slurm login node)"
    mkdir -p "$PARTS"
    export BACKBONE CACHE DATA_ARGS N PARTS EXTRACT_ARGS DEVICE SHERL_BIN MODEL
    local script array_id merge_id
    script="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
    array_id="$(sbatch --parsable --array="0-$((N - 1))" "$script" worker)"
    array_id="${array_id%%;*}" # --parsable prints "id" or "id;cluster"
    merge_id="$(sbatch --parsable --job-name=sherl-merge \
        --dependency="afterok:$array_id" --kill-on-invalid-dep=yes \
        --cpus-per-task=2 --output="sherl-merge-%j.out" "$script" merge)"
    say "queued workers $array_id (array 0-$((N - 1))) and merge ${merge_id%%;*} -> $CACHE"
    echo "$array_id ${merge_id%%;*}"
}

# worker: one array task, worker I = SLURM_ARRAY_TASK_ID of N.
worker() {
    check_env
    local i="${SLURM_ARRAY_TASK_ID:?worker runs as a Slurm array task}"
    local part="$PARTS/part-$i"
    if [ -f "$part/manifest.part.json" ]; then
        say "worker $i/$N: $part is finished"
        return 0
    fi
    # `--resume` continues a part that has extract.pending.json and starts an
    # empty or missing one. A part directory without it was killed before
    # anything was written (at most an empty shards/): clear it.
    if [ -d "$part" ] && [ ! -e "$part/extract.pending.json" ]; then
        rmdir "$part/shards" 2>/dev/null || true
        rmdir "$part" 2>/dev/null \
            || die "$part has files but no extract.pending.json or manifest.part.json: not a sherl part, move it away"
    fi
    # Flags as arrays (split on whitespace, no glob expansion); the
    # ${a[@]+"${a[@]}"} form keeps empty arrays legal under `set -u` in bash < 4.4.
    local data_args=() extract_args=() model_args=()
    read -r -a data_args <<<"$DATA_ARGS"
    read -r -a extract_args <<<"$EXTRACT_ARGS"
    if [ -n "$MODEL" ]; then model_args=(--model "$MODEL"); fi
    say "worker $i/$N on $(hostname): $part"
    "$SHERL_BIN/sherl-extract" run \
        --backbone "$BACKBONE" ${model_args[@]+"${model_args[@]}"} \
        "${data_args[@]}" ${extract_args[@]+"${extract_args[@]}"} \
        --device "$DEVICE" --threads "${SLURM_CPUS_PER_TASK:-1}" \
        --shard-of "$i/$N" --out "$part" --resume
}

# merge: after every worker succeeded.
merge() {
    check_env
    if [ -e "$CACHE/manifest.json" ]; then
        say "$CACHE is already merged"
        return 0
    fi
    # A merge that died half-way leaves a non-empty $CACHE without
    # manifest.json, which `sherl-cache merge` refuses: delete $CACHE, re-run.
    # The N parts by name (not a part-* glob, which would also pick up parts
    # left from an earlier run with a larger N).
    local parts=() i
    for ((i = 0; i < N; i++)); do parts+=("$PARTS/part-$i"); done
    "$SHERL_BIN/sherl-cache" merge "${parts[@]}" --out "$CACHE"
    "$SHERL_BIN/sherl-cache" verify "$CACHE"
}

case "${1:-}" in
    submit) submit ;;
    worker) worker ;;
    merge) merge ;;
    *)
        echo "usage: pipelines/slurm-extract.sh submit|worker|merge (see the comments at the top)" >&2
        exit 2
        ;;
esac
