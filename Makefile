# The two commands from the README: `make demo` and `make test`. Both build .venv from scratch when needed.
# GPU hosts choose their torch build: `make test TORCH_SPEC="torch==2.13.0 --index-url https://..."`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PIP := $(VENV)/bin/python -m pip
STAMP := $(VENV)/.installed

.PHONY: demo test install lint slurm clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet $(TORCH_SPEC)
	$(PIP) install --quiet -c constraints.txt -e ".[dev,trackers,tracking-server]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pretrain demo demo_out

# Slurm (Debian's packages) is installed for the tests that start a real 2-node cluster on loopback.
slurm:
	bash tools/install_slurm.sh

test: $(STAMP) slurm
	$(VENV)/bin/ruff check pretrain launch tools tests
	$(VENV)/bin/lint-imports  # the import layers in pyproject.toml
	$(VENV)/bin/python -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check pretrain launch tools tests
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) demo_out .pytest_cache
