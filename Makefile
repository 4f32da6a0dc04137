# The two commands of the README: `make demo` and `make test`. Both create .venv if it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= 2

.PHONY: demo test test-all lint format slurm-test bench gpu-check paper-smoke paper-smoke-test lock clean

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

## the study on the embedded default (synthetic cohort): tables, figures and stats under results/
demo: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) --workflow-profile profiles/default

## the fast test suite
test: $(STAMP)
	$(BIN)/pytest -q -rs

## everything, slow tests included (end-to-end run, real SLURM)
test-all: $(STAMP)
	$(BIN)/pytest -q -rs -m "not paper_smoke"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/snakefmt --check Snakefile workflow/rules
	$(BIN)/snakemake --lint

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .
	$(BIN)/snakefmt Snakefile workflow/rules

## a real one-node SLURM (installs Debian's slurm packages; root) running a tiny workflow through profiles/slurm
slurm-test: $(STAMP)
	bash tests/slurm/run_slurm_test.sh

bench: $(STAMP)
	$(BIN)/python benchmarks/delong.py
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/register.py

## on a CUDA machine: CPMN at the paper's 224x224x96, batch 6, bf16 (s/step, peak memory, TFLOP/s); < 5 min on one H100
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py --out gpu_check.json

## the whole workflow at the paper's scale on CPU (config/paper.yaml, 6 patients at a clinical grid, 2 steps per
## variant); every job's seconds and peak RSS land in results/paper-smoke/benchmarks/
paper-smoke: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) --workflow-profile profiles/default --resources mem_mb=22000 \
	  --configfile config/paper.yaml config/paper-smoke.yaml

## the same run as a test, into a temporary folder, with its outputs checked (tests/test_paper_smoke.py)
paper-smoke-test: $(STAMP)
	$(BIN)/pytest -q -rs -m paper_smoke

## re-resolve the lock file from the direct dependencies (needs the package index)
lock:
	rm -rf /tmp/cpmn-lock && $(PYTHON) -m venv /tmp/cpmn-lock
	/tmp/cpmn-lock/bin/pip install --quiet torch==2.13.0 "numpy<2.4" antspyx==0.6.3 monai einops \
	  dynamic-network-architectures==0.3.1 \
	  "snakemake>=9,<10" snakemake-executor-plugin-slurm nibabel pydicom dcm2niix pandas scikit-learn \
	  statsmodels matplotlib scipy h5py tqdm pyyaml jsonschema pytest ruff snakefmt
	{ echo "# Pinned, resolved set (pip freeze of a fresh venv). Regenerate with: make lock"; \
	  /tmp/cpmn-lock/bin/pip freeze | sed 's/+cpu$$//'; } > requirements.lock

clean:
	rm -rf results/* .snakemake
