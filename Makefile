# The two commands from the README: `make demo` and `make test`. Both build .venv from scratch when needed.
# GPU hosts choose their torch build: `make test TORCH_SPEC="torch==2.13.0 --index-url https://..."`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PIP := $(VENV)/bin/python -m pip
STAMP := $(VENV)/.installed

.PHONY: demo test install lint slurm clean video-parity-env

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet $(TORCH_SPEC)
	$(PIP) install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# A second environment for the one test that runs transformers' own video processor
# (tests/export/test_video_parity.py): it needs torchvision, which does not load beside the CPU torch the project
# pins, so it gets torch 2.14.1 + torchvision 0.29.1 here (5.5 GB) while the project keeps its own torch.
VIDEO_VENV ?= .venv-video
VIDEO_STAMP := $(VIDEO_VENV)/.installed
$(VIDEO_STAMP): constraints.txt
	$(PYTHON) -m venv $(VIDEO_VENV)
	$(VIDEO_VENV)/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(VIDEO_VENV)/bin/python -m pip install --quiet -c constraints.txt transformers==5.23.0 av==18.1.0 pillow==13.0.0
	touch $(VIDEO_STAMP)

video-parity-env: $(VIDEO_STAMP)

demo: $(STAMP)
	$(VENV)/bin/pretrain demo demo_out

# Slurm (Debian's packages) is installed for the tests that start a real 2-node cluster on loopback.
slurm:
	bash tools/install_slurm.sh

test: $(STAMP) slurm $(VIDEO_STAMP)
	$(VENV)/bin/ruff check pretrain launch tools tests
	$(VENV)/bin/lint-imports  # the import layers in pyproject.toml
	$(VENV)/bin/python -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check pretrain launch tools tests
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) $(VIDEO_VENV) demo_out .pytest_cache
