#!/usr/bin/env bash
# Builds the Python storage plugin into OUT_DIR/storage-python.wasm with
# componentize-py (from $HOME/.cache/replicator-venv when present, else
# PATH; scripts/build-examples installs it there).
# Usage: build.sh OUT_DIR
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi
here="$(cd "$(dirname "$0")" && pwd)"
wit="$here/../../wit"
mkdir -p "$1"
out="$(cd "$1" && pwd)/storage-python.wasm"

venv_bin="$HOME/.cache/replicator-venv/bin"
if [ -x "$venv_bin/componentize-py" ]; then
    cpy="$venv_bin/componentize-py"
elif command -v componentize-py >/dev/null 2>&1; then
    cpy="componentize-py"
else
    echo "error: componentize-py not found; run scripts/build-examples (or pip install componentize-py==0.17.2)" >&2
    exit 1
fi

# The bindings (the `wit_world` package app.py imports) are generated into
# a scratch directory next to a copy of the app, so the source tree stays clean.
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp "$here/app.py" "$here/storage.py" "$work/"
"$cpy" -d "$wit" -w storage-plugin bindings "$work"
(cd "$work" && "$cpy" -d "$wit" -w storage-plugin componentize -p "$work" -o "$out.tmp" app)
mv "$out.tmp" "$out"
echo "built $out ($(wc -c <"$out") bytes)"
