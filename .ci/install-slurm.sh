#!/usr/bin/env bash
# Installs only what tests/test_slurm.py needs (the Slurm, munge and MariaDB packages and munge's
# key), when missing; see .ci/install-test-deps.sh, which `make test` runs for the whole suite.
set -euo pipefail
exec bash "$(dirname "$0")/install-test-deps.sh" slurm
