#!/usr/bin/env bash
# Builds the JavaScript storage plugin into OUT_DIR/storage-js.wasm with
# componentize-js, from the versions pinned in package-lock.json (run
# `npm ci` here once; nothing is installed globally).
# Usage: build.sh OUT_DIR
# REPLICATOR_WIT names the host's wit/ directory (default: ../../wit, where it
# sits when this example lives in the repository's examples/).
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi
here="$(cd "$(dirname "$0")" && pwd)"
wit="${REPLICATOR_WIT:-$here/../../wit}"
if [ ! -f "$wit/storage.wit" ]; then
    echo "error: no Replicator wit/ at $wit; set REPLICATOR_WIT to the host's wit/ directory" >&2
    exit 1
fi
cjs="$here/node_modules/.bin/componentize-js"
wasi="$here/node_modules/@bytecodealliance/jco/lib/wit/builtin/0.2.12"
if [ ! -x "$cjs" ] || [ ! -d "$wasi" ]; then
    echo "error: componentize-js not installed; run \`npm ci\` in $here" >&2
    exit 1
fi
mkdir -p "$1"
out="$(cd "$1" && pwd)/storage-js.wasm"

# The WIT (Replicator's, our world, the WASI packages it imports) and a copy
# of the source go to a scratch directory, so the source tree stays clean.
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/wit/deps"
cp "$wit"/*.wit "$here/wit-js/storage-js.wit" "$work/wit/"
for pkg in io clocks filesystem; do
    cp -r "$wasi/wasi-$pkg" "$work/wit/deps/"
done
cp "$here/app.js" "$work/"
# componentize-js makes its own work directory under TMPDIR and leaves it
# behind when a build fails: keep it inside ours.
mkdir -p "$work/tmp"
export TMPDIR="$work/tmp"
# `-d http fetch-event`: the plugin makes no HTTP calls, so the engine's
# fetch() support (and its wasi:http imports) are left out.
"$cjs" --wit "$work/wit" --world-name storage-plugin-js -d http fetch-event \
    -o "$out.tmp" "$work/app.js"
mv "$out.tmp" "$out"
echo "built $out ($(wc -c <"$out") bytes)"
