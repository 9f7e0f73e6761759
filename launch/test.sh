#!/usr/bin/env bash
# The whole test suite: set up (with dev tools), lint + format check, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh --dev
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q "$@"
