# The two commands from the README: `make demo` and `make test`. Both build .venv from scratch when needed.
# GPU hosts choose their torch build: `make test TORCH_SPEC="torch==2.13.0 --index-url https://..."`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PIP := $(VENV)/bin/python -m pip
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast install lint slurm img2dataset video-parity-env clean gpu-wheels gpu-commit

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet $(TORCH_SPEC)
	$(PIP) install --quiet -c constraints.txt -e ".[dev,trackers,tracking-server]"
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

# The real img2dataset, for the tests that read its output as it is. It pins webdataset<0.3 (this project: 1.x),
# so it gets a venv of its own.
IMG2DATASET_VENV ?= .venv-img2dataset
$(IMG2DATASET_VENV)/.installed: tools/img2dataset-requirements.txt
	$(PYTHON) -m venv $(IMG2DATASET_VENV)
	$(IMG2DATASET_VENV)/bin/python -m pip install --quiet -r tools/img2dataset-requirements.txt
	touch $@

img2dataset: $(IMG2DATASET_VENV)/.installed

test: $(STAMP) slurm img2dataset $(VIDEO_STAMP)
	$(VENV)/bin/ruff check pretrain launch tools tests
	$(VENV)/bin/lint-imports  # the import layers in pyproject.toml
	$(VENV)/bin/python -m pytest -q --durations=25 tests

# The tests that start no process (no torchrun, Slurm, loader workers or subprocess), for iteration: a few minutes.
# The guard plug-in fails a test that starts one without being marked slow or slurm.
test-fast: $(STAMP)
	$(VENV)/bin/ruff check pretrain launch tools tests
	$(VENV)/bin/python -m pytest -q -p helpers.no_spawn -m "not slow and not slurm" --durations=10 tests

lint: $(STAMP)
	$(VENV)/bin/ruff check pretrain launch tools tests
	$(VENV)/bin/lint-imports

# Before a lent GPU machine's one call of tools/gpu_bench.sh (its header): the wheels it lacks, and the commit.
gpu-wheels: $(STAMP)
	bash tools/gpu_wheels.sh

gpu-commit:
	bash tools/gpu_commit.sh

clean:
	rm -rf $(VENV) $(IMG2DATASET_VENV) $(VIDEO_VENV) demo_out .pytest_cache
