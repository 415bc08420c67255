#!/usr/bin/env bash
# Fuzzes every target for a bounded time on the stable toolchain, over the
# committed seed corpus, and fails on any crash, timeout or out-of-memory.
#
# cargo-fuzz passes -Z flags (sanitizer, coverage instrumentation) to rustc;
# RUSTC_BOOTSTRAP=1 lets stable rustc accept them, so no nightly is needed.
#
# Environment (all optional):
#   FUZZ_SECONDS_PER_TARGET  run time of each target (default 20)
#   FUZZ_TARGETS             space-separated targets (default: all, `cargo fuzz list`)
#   FUZZ_SANITIZER           address (default) or none
#   FUZZ_TOOLS               where cargo-fuzz is installed (default ~/.cache/plugca-fuzz/tools)
#   FUZZ_TARGET_DIR          cargo's target dir for the fuzz build (default ~/.cache/plugca-fuzz/target,
#                            outside the clone so a fresh clone on the same machine builds incrementally)
#
# A crashing input is copied to fuzz/regressions/<target>/, where
# tests/fuzz_regressions.rs replays it under `cargo test`; in CI, whose clone
# is thrown away, the input is also printed in base64.
set -euo pipefail
cd "$(dirname "$0")"
fuzz_dir=$PWD

CARGO_FUZZ_VERSION=0.13.1
tools=${FUZZ_TOOLS:-$HOME/.cache/plugca-fuzz/tools}
target_dir=${FUZZ_TARGET_DIR:-$HOME/.cache/plugca-fuzz/target}
seconds=${FUZZ_SECONDS_PER_TARGET:-20}
sanitizer=${FUZZ_SANITIZER:-address}
# Per run: libFuzzer's RSS ceiling (ASan's shadow memory counts), and the
# largest single allocation before it is reported as out-of-memory.
rss_limit_mb=2048
malloc_limit_mb=512
# Slowest single input before it is reported as a hang.
timeout_s=10

if [[ "$("$tools/bin/cargo-fuzz" --version 2>/dev/null)" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]]; then
  echo "== installing cargo-fuzz $CARGO_FUZZ_VERSION into $tools"
  cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION" --root "$tools"
fi
export PATH="$tools/bin:$PATH" RUSTC_BOOTSTRAP=1

# Debug assertions on: integer overflow and slice arithmetic mistakes panic.
echo "== cargo fuzz build (sanitizer: $sanitizer)"
cargo fuzz build --sanitizer "$sanitizer" --debug-assertions --target-dir "$target_dir"

targets=${FUZZ_TARGETS:-$(cargo fuzz list)}
triple=$(rustc -vV | sed -n 's/^host: //p')
bin_dir=$target_dir/$triple/release
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

max_len() {
  case $1 in
    csr | pem) echo 16384 ;;
    bundle) echo 32768 ;;
    jwt) echo 8192 ;;
    *) echo 4096 ;;
  esac
}

failed=()
for target in $targets; do
  seeds=$fuzz_dir/corpus/$target
  work=$scratch/$target/corpus
  artifacts=$scratch/$target/artifacts
  mkdir -p "$work" "$artifacts"
  # Fuzz a copy: new inputs go to the copy, the committed corpus stays small.
  if [[ -d $seeds ]]; then cp "$seeds"/* "$work"/; fi
  seed_count=$(find "$work" -type f | wc -l)
  log=$scratch/$target.log
  status=0
  "$bin_dir/$target" "$work" \
    -max_total_time="$seconds" -max_len="$(max_len "$target")" \
    -rss_limit_mb="$rss_limit_mb" -malloc_limit_mb="$malloc_limit_mb" \
    -timeout="$timeout_s" -print_final_stats=1 \
    -artifact_prefix="$artifacts/" >"$log" 2>&1 || status=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  found=$(find "$artifacts" -type f | sort)
  crashes=$(printf '%s' "$found" | grep -c . || true)
  printf 'fuzz %-9s %10s execs %7s exec/s  corpus %3s -> %4s  crashes %s\n' \
    "$target" "${execs:-?}" "${rate:-?}" "$seed_count" "$(find "$work" -type f | wc -l)" "$crashes"
  if [[ $status -ne 0 || $crashes -ne 0 ]]; then
    failed+=("$target")
    echo "---- $target failed (exit $status); libFuzzer's output:"
    grep -v '^#[0-9]' "$log" | tail -60
    mkdir -p "$fuzz_dir/regressions/$target"
    for input in $found; do
      kept=$fuzz_dir/regressions/$target/$(basename "$input")
      cp "$input" "$kept"
      echo "---- crashing input kept as ${kept#"$fuzz_dir"/../}"
      echo "     replay: $bin_dir/$target $kept"
      if [[ $(stat -c %s "$input") -le 4096 ]]; then
        echo "     base64: $(base64 -w0 "$input")"
      fi
    done
  fi
done

if [[ ${#failed[@]} -ne 0 ]]; then
  echo "fuzzing failed: ${failed[*]}"
  exit 1
fi
echo "fuzzing passed: $(echo $targets | wc -w) targets, ${seconds}s each"
