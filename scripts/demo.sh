#!/usr/bin/env bash
# Set up (see setup.sh) and run the embedded demo: two agents on this machine, a generated
# memory image, a workload restored post-copy, a progress bar and a report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/pagewire demo "$@"
