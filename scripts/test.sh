#!/usr/bin/env bash
# Set everything up, lint, then run the whole test suite. Extra arguments go to pytest.
# A lint error fails the run before any test starts.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "lint: ruff check node tests bench"
.venv/bin/ruff check node tests bench
export RTNODE_REQUIRE_TOOLS=1
exec .venv/bin/python -m pytest "$@"
