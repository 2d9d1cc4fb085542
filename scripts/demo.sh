#!/usr/bin/env bash
# Set up, then run the main job: compile and inspect the paper's FM/16 network.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup.sh
neugraph inspect --example fm16 "$@"
