#!/usr/bin/env bash
# Set up, fetch the data, then run the main job: train FM/16 with AdamW and with AdamW + the shipped
# nowcaster on the same seed and batches; print steps to target and the reduction, save a plot.
# Extra arguments go to `nowcast demo` (e.g. --seed 1, --nowcaster published, --steps 2000).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup.sh
bash scripts/fetch_data.sh
nowcast demo "$@"
