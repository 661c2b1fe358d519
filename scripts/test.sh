#!/usr/bin/env bash
# Set everything up, then run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RTNODE_REQUIRE_TOOLS=1
exec .venv/bin/python -m pytest "$@"
