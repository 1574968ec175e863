# Sourced by the benchmarks that serve a volume themselves (serve-bench, write-syncs, qd1-reads).
# bench_setup DIR: install the test dependencies, set REWIND — $REWIND_BIN if given, else a
# fresh release build — and leave DIR empty.
bench_setup() {
    scripts/install-deps.sh test >/dev/null
    if [ -n "${REWIND_BIN:-}" ]; then REWIND=$REWIND_BIN; else
        swift build -c release --product rewind >/dev/null
        REWIND=$PWD/.build/release/rewind
    fi
    rm -rf "$1"; mkdir -p "$1"
}
