#!/usr/bin/env bash
# Snakemake (--sdm conda) runs this inside the new environment, from its own place in envs/ (the env file
# itself is copied to .snakemake/conda/<hash>.yaml, where a relative path would miss the project). It
# installs the project, without dependencies (the env file pins them), from the folder above envs/.
set -euo pipefail
project="$(cd "$(dirname "$0")/.." && pwd)"
python -m pip install --no-deps --editable "$project"
