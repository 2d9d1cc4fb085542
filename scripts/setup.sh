#!/usr/bin/env bash
# Set up .venv with the CPU build of torch first (a bare `torch` requirement can pull a multi-GB
# CUDA build), then this project with its dev extra. Safe to run again; sourced by demo.sh/test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
if [[ ",${EXTRAS:-}," == *",scatter,"* ]]; then
  # torch-scatter builds against the torch installed above (about 5 minutes the first time; pip
  # caches the wheel); without --no-build-isolation pip would fetch a CUDA torch to build it
  python -m pip install -q --no-build-isolation "torch-scatter>=2.1"
fi
python -m pip install -q -e ".[dev${EXTRAS:+,$EXTRAS}]"
