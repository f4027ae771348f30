#!/usr/bin/env bash
# Build the example storage plugin and write OUT_DIR/storage-rust.wasm.
#   ./build.sh OUT_DIR
# Needs the wasm32-wasip2 Rust target (rustup target add wasm32-wasip2).
set -euo pipefail
if [ $# -ne 1 ]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi
here="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$1"
out="$(cd "$1" && pwd)"
# Build outside the source tree, next to the repository's other builds.
target="${CARGO_TARGET_DIR:-$here/../../target}/examples-build/storage-rust"
# Flags meant for a host build must not reach the wasm one.
unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS RUSTC_WRAPPER RUSTC_WORKSPACE_WRAPPER CARGO_BUILD_RUSTFLAGS
cargo build --manifest-path "$here/Cargo.toml" --release --locked \
    --target wasm32-wasip2 --target-dir "$target"
cp "$target/wasm32-wasip2/release/storage_rust.wasm" "$out/storage-rust.wasm"
echo "$out/storage-rust.wasm"
