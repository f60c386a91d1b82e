#!/usr/bin/env bash
# Real apps for the browser tests (tests/test_realapps_browser.py), each in a prefix of its own
# under DEST (default .venv/realapps), with the jupyter-*-proxy package that starts it:
#   DEST/plugins/<app>/   the proxy package (pip --no-deps --target: outside site-packages, so
#                         only the trioproxy a test points at it with PYTHONPATH sees its entry point)
#   DEST/tensorboard/, DEST/marimo/   venvs with the app
#   DEST/code-server/     npm prefix with code-server (node 20: 4.99.x is its last line for it)
# Panel runs from the test venv (panel is in the test extra).
# A part whose stamp file holds the same pins is kept: a second run takes a second.
# code-server builds native modules: it needs g++, make, python3 and libkrb5-dev (.ci/run installs
# them); its @vscode/ripgrep would download rg from GitHub, so Debian's ripgrep is put where that
# postinstall looks for its cached download.
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST="${1:-.venv/realapps}"
PYTHON="${PYTHON:-python}"
mkdir -p "$DEST"
DEST="$(cd "$DEST" && pwd)"

TENSORBOARD="tensorboard==2.21.0"
MARIMO="marimo==0.25.2"
CODE_SERVER="code-server@4.99.4"
RIPGREP_CACHE="vscode-ripgrep-cache-1.15.11/ripgrep-v13.0.0-10-x86_64-unknown-linux-musl.tar.gz"
PLUGINS=(
    "tensorboard jupyter-tensorboard-proxy==0.1.1"
    "marimo jupyter-marimo-proxy==0.0.4"
    "panel jupyter-panel-proxy==0.2.0"
    "vscode jupyter-vscode-proxy==0.7"
)

fresh() {  # fresh DIR SPEC: is DIR installed with SPEC?
    [ -f "$1/.installed" ] && [ "$(cat "$1/.installed")" = "$2" ]
}
done_with() {
    echo "$2" > "$1/.installed"
}

for plugin in "${PLUGINS[@]}"; do
    read -r app spec <<< "$plugin"
    dir="$DEST/plugins/$app"
    fresh "$dir" "$spec" && continue
    rm -rf "$dir"
    "$PYTHON" -m pip install -q --no-deps --target "$dir" "$spec"
    done_with "$dir" "$spec"
done

for app in tensorboard marimo; do
    spec=$([ "$app" = tensorboard ] && echo "$TENSORBOARD" || echo "$MARIMO")
    dir="$DEST/$app"
    fresh "$dir" "$spec" && continue
    rm -rf "$dir"
    "$PYTHON" -m venv "$dir"
    "$dir/bin/python" -m pip install -q "$spec"
    done_with "$dir" "$spec"
done

dir="$DEST/code-server"
if ! fresh "$dir" "$CODE_SERVER"; then
    rm -rf "$dir"
    mkdir -p "$dir/tmp/$(dirname "$RIPGREP_CACHE")"
    tar czf "$dir/tmp/$RIPGREP_CACHE" -C "$(dirname "$(command -v rg)")" rg
    # npm_config_yes: node-pty's postinstall runs `npx node-gyp`, which would ask.
    TMPDIR="$dir/tmp" npm_config_yes=true npm install --prefix "$dir" --no-fund --no-audit --prefer-offline --loglevel=error \
        --unsafe-perm "$CODE_SERVER"
    HOME="$dir/tmp" "$dir/node_modules/.bin/code-server" --version
    rm -rf "$dir/tmp"
    done_with "$dir" "$CODE_SERVER"
fi
