# Sourced by the pipeline scripts, not run: where cargo puts the binaries it
# builds, so that the scripts work with CARGO_TARGET_DIR set (relative or
# absolute) or a `build.target-dir` in a .cargo/config.toml.
#
#   . "$(dirname "$0")/target-dir.sh"   # before the script's `cd`
#   cd "$(dirname "$0")/.."
#   cargo build --release --bins
#   BIN="$(sherl_release_dir)"
#
# Sourced before the `cd`, it makes a relative CARGO_TARGET_DIR absolute
# against the directory the script was started from, which is where cargo
# would have read it from.
if [ -n "${CARGO_TARGET_DIR:-}" ]; then
    case "$CARGO_TARGET_DIR" in
        /*) ;;
        *) CARGO_TARGET_DIR="$PWD/$CARGO_TARGET_DIR" ;;
    esac
    export CARGO_TARGET_DIR
fi

# The folder of the release binaries of the repository in the current
# directory, as cargo itself names its target directory.
sherl_release_dir() {
    local dir
    dir="$(cargo metadata --format-version 1 --no-deps --offline 2>/dev/null \
        | grep -o '"target_directory":"[^"]*"' | head -n 1 | cut -d'"' -f4)"
    [ -n "$dir" ] || dir="${CARGO_TARGET_DIR:-$PWD/target}"
    printf '%s/release\n' "$dir"
}
