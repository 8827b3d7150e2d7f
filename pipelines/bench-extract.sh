#!/usr/bin/env bash
# Extraction benchmark (a benchmark, not a test: it never fails on a missed
# goal, it reports it). MiniLM-L6 over the Rotten Tomatoes review snippets
# (the `plot` rows dropped, split 80/10/10 by movie), on CPU:
#
#  (a) tokens/s of sherl's full write path (`sherl::extract::run::run`, end
#      to end into a fresh cache) against bare ONNX Runtime
#      (`BackboneSession::run` alone) on the same batches, in one process,
#      alternating which goes first (goal: overhead <= 5%);
#  (b) length-bucketed batches against padding every example to 128 (bare
#      ORT, real tokens/s and padded-token counts);
#  (c) bytes on disk per token against raw f32, per dtype, shuffle on/off,
#      zstd 1 (and f16 at zstd 3) (goals: f16 <= 0.45, int8 <= 0.25);
#  (d) reader decode throughput (read_chunk on 1 thread, Cache::stream on 2);
#  (e) peak memory (max RSS) of `sherl-extract run` on a subset and on all
#      examples.
#
# (a), (b), (d) run in benches/extract.rs (`cargo bench --bench extract`);
# (c), (e) run the sherl-extract binary. Results: a table on stdout and
# target/bench/extract.json. Takes about 10 minutes on 2 cores.
#
#   pipelines/bench-extract.sh
#
# Sizes (environment variables): BENCH_REPS (a) repetitions [2];
# BENCH_PADDED_N (b) examples [1000]; BENCH_PADDED_REPS [1];
# BENCH_STORAGE_N (c) examples [1000]; BENCH_RSS_SMALL_N (e) [1000];
# BENCH_THREADS ORT intra-op threads [ORT default: one per core];
# BENCH_DATA another CSV with the columns category,text,movie_name (a quick
# smoke run) [the Rotten Tomatoes file].
set -euo pipefail
. "$(dirname "$0")/target-dir.sh"   # CARGO_TARGET_DIR, relative or absolute
cd "$(dirname "$0")/.."

REPS="${BENCH_REPS:-2}"
PADDED_N="${BENCH_PADDED_N:-1000}"
PADDED_REPS="${BENCH_PADDED_REPS:-1}"
STORAGE_N="${BENCH_STORAGE_N:-1000}"
RSS_SMALL_N="${BENCH_RSS_SMALL_N:-1000}"
THREADS="${BENCH_THREADS:-}"

T0=$(date +%s)
read -r LOAD1 _ </proc/loadavg || LOAD1=0
echo "== load average at start: $LOAD1 on $(nproc) cores" \
    "(other work on this machine skews every timing below)" >&2
ASSETS="$(pipelines/fetch-assets.sh ort minilm rotten-tomatoes)"
BACKBONE="$ASSETS/backbones/all-MiniLM-L6-v2"
DATA="${BENCH_DATA:-$ASSETS/data/rotten_tomatoes_corpus_full.csv.bz2}"

OUT=target/bench
WORK="$OUT/extract"
rm -rf "$WORK"
mkdir -p "$WORK/bin"

# Build, then run copies of the binaries, so that a rebuild by someone else
# halfway through cannot change what is measured (or stall on the cargo lock).
echo "== building (release)" >&2
cargo build --release --bins --quiet
BENCH_EXE="$(cargo bench --bench extract --no-run --quiet --message-format=json \
    | grep '"kind":\["bench"\]' | grep -o '"executable":"[^"]*"' | tail -n 1 | cut -d'"' -f4)"
[ -x "$BENCH_EXE" ] || { echo "bench-extract: cannot find the bench executable" >&2; exit 2; }
cp "$(sherl_release_dir)/sherl-extract" "$BENCH_EXE" "$WORK/bin/"
BIN="$WORK/bin"
BENCH_BIN="$BIN/$(basename "$BENCH_EXE")"
MODEL="$WORK/model.onnx"
CLI_RESULTS="$WORK/cli-results.jsonl"
: >"$CLI_RESULTS"

echo "== exporting MiniLM to $MODEL" >&2
"$BIN/sherl-extract" -q export-onnx --backbone "$BACKBONE" --out "$MODEL" >/dev/null

# Dataset flags: the Rotten Tomatoes snippets, plot rows dropped, split by movie.
DATASET_FLAGS=(--text-column text --label-column category --labels fresh,rotten
    --split train=0.8,valid=0.1,test=0.1 --group-column movie_name --split-seed 0)
THREAD_FLAGS=()
if [ -n "$THREADS" ]; then THREAD_FLAGS=(--threads "$THREADS"); fi

# The bench target's subcommands (what `cargo bench --bench extract -- ARGS` runs).
bench() { "$BENCH_BIN" "$@" --bench; }

echo "== writing subsets" >&2
bench subset --out "$WORK/storage-subset.csv" --n "$STORAGE_N" --data "$DATA" "${DATASET_FLAGS[@]}"
bench subset --out "$WORK/rss-subset.csv" --n "$RSS_SMALL_N" --data "$DATA" "${DATASET_FLAGS[@]}"

# run_cmd DATA OUT_DIR: the sherl-extract run command line, in RUN.
run_cmd() {
    RUN=("$BIN/sherl-extract" -q run --backbone "$BACKBONE" --model "$MODEL" --out "$2"
        --data "$1" "${DATASET_FLAGS[@]}" --device cpu ${THREAD_FLAGS[@]+"${THREAD_FLAGS[@]}"})
}
# extract DATA OUT_DIR [flags...]: run into a fresh OUT_DIR; summary JSON on stdout.
extract() {
    run_cmd "$1" "$2"; rm -rf "$2"; shift 2
    "${RUN[@]}" "$@"
}

# (c) storage per dtype / shuffle / zstd level.
echo "== (c) storage: $STORAGE_N examples per run" >&2
for cfg in "f16 on 1" "f16 off 1" "f16 on 3" "bf16 on 1" "bf16 off 1" \
           "f32 on 1" "f32 off 1" "int8 on 1" "int8 off 1"; do
    read -r dtype shuffle level <<<"$cfg"
    flags=(--dtype "$dtype" --zstd-level "$level")
    if [ "$shuffle" = off ]; then flags+=(--no-shuffle); fi
    summary="$(extract "$WORK/storage-subset.csv" "$WORK/storage-cache" "${flags[@]}")"
    [ "$shuffle" = on ] && sh=true || sh=false
    printf '{"kind":"storage","dtype":"%s","shuffle":%s,"zstd_level":%s,"summary":%s}\n' \
        "$dtype" "$sh" "$level" "$summary" >>"$CLI_RESULTS"
    echo "   $dtype shuffle=$shuffle zstd=$level: $summary" >&2
done
rm -rf "$WORK/storage-cache"

# (e) peak memory: /usr/bin/time -v if present, else the children's
# ru_maxrss through Python (which fetch-assets.sh needs anyway).
if [ -x /usr/bin/time ] && /usr/bin/time -v true >/dev/null 2>&1; then
    RSS_METHOD="/usr/bin/time -v"
else
    RSS_METHOD="python3 resource.getrusage(RUSAGE_CHILDREN).ru_maxrss"
fi
# peak DATA OUT_DIR: run with defaults under the RSS probe, append a result line.
peak() {
    local summary kb
    run_cmd "$1" "$2"; rm -rf "$2"
    if [ "$RSS_METHOD" = "/usr/bin/time -v" ]; then
        summary="$(/usr/bin/time -v -o "$WORK/time.txt" "${RUN[@]}")"
        kb="$(awk -F: '/Maximum resident set size/ {gsub(/ /, "", $2); print $2}' "$WORK/time.txt")"
    else
        summary="$(python3 -c '
import resource, subprocess, sys
out = subprocess.run(sys.argv[2:], stdout=subprocess.PIPE, check=True).stdout
sys.stdout.write(out.decode())
open(sys.argv[1], "w").write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
' "$WORK/rss.kb" "${RUN[@]}")"
        kb="$(cat "$WORK/rss.kb")"
    fi
    printf '{"kind":"rss","max_rss_kb":%s,"method":"%s","summary":%s}\n' \
        "$kb" "$RSS_METHOD" "$summary" >>"$CLI_RESULTS"
    echo "   max RSS ${kb} kB: $summary" >&2
}
echo "== (e) peak memory ($RSS_METHOD): $RSS_SMALL_N examples, then all" >&2
peak "$WORK/rss-subset.csv" "$WORK/rss-cache"
peak "$DATA" "$WORK/rss-cache"
rm -rf "$WORK/rss-cache"

# (a), (b), (d) in one process.
echo "== (a) overhead x$REPS, (b) bucketing on $PADDED_N examples, (d) decode" >&2
bench measure --backbone "$BACKBONE" --model "$MODEL" --work "$WORK" \
    --json "$WORK/lib-results.json" --reps "$REPS" \
    --padded-subset "$PADDED_N" --padded-reps "$PADDED_REPS" --stream-threads 2 \
    ${THREAD_FLAGS[@]+"${THREAD_FLAGS[@]}"} --data "$DATA" "${DATASET_FLAGS[@]}"
rm -rf "$WORK/caches"

echo
echo "sizes used: (a) all examples x $REPS reps; (b) first $PADDED_N examples x $PADDED_REPS;" \
    "(c) $STORAGE_N evenly spaced examples; (d) the cache of (a); (e) $RSS_SMALL_N evenly spaced examples and all"
bench report --lib "$WORK/lib-results.json" --cli "$CLI_RESULTS" --out "$OUT/extract.json"
echo "total wall time: $(( $(date +%s) - T0 ))s"
