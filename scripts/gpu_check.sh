#!/usr/bin/env bash
# make gpu-check: run scripts/gpu_check.py (the GPU acceptance run) with the right interpreter, on a machine
# with this checkout's install or on the lent GPU machine, which has no registry and no .venv:
#   - GPU_PYTHON, if set, runs it (e.g. GPU_PYTHON=python3);
#   - else this checkout's .venv/bin/python, if there is one (make install made it);
#   - else python3, with .gpu-bundle/*.whl (make gpu-bundle) installed first into GPU_SITE (default
#     /tmp/site) with pip install --no-index --no-deps, and put on PYTHONPATH.
# Arguments go to gpu_check.py (--only, --log, --copy-to, ...). Exit status: gpu_check.py's.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${GPU_PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [ "$PY" != .venv/bin/python ] && compgen -G ".gpu-bundle/*.whl" > /dev/null; then
  SITE=${GPU_SITE:-/tmp/site}
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" .gpu-bundle/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" scripts/gpu_check.py "$@"
