#!/usr/bin/env bash
# Set up, then run the whole test suite. pytest's "no tests collected" (exit 5) is a failure here.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
EXTRAS=${EXTRAS-scatter}  # the suite runs with torch-scatter (its default backend when installed) ...
. scripts/setup.sh
bash scripts/fetch_data.sh  # real datasets into $NOWCAST_DATA (default ./data); skips what is there
set +e
python -m pytest -q "$@"
rc=$?
if [ "$rc" -eq 0 ] && [ "$#" -eq 0 ]; then  # ... and the nowcasters once more on the native backend
  NOWCAST_SCATTER=native python -m pytest -q tests/test_nowcast_*.py
  rc=$?
fi
set -e
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests; treating that as a failure" >&2
  exit 1
fi
exit "$rc"
