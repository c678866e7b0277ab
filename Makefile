# The two entry points of the README. Each sets up .venv on first use and is quick afterwards.
# TORCH_SPEC pins the build this machine carries on disk (a CUDA build that runs on the CPU);
# pyproject itself only asks for torch>=2.4. Override it elsewhere, e.g. make test TORCH_SPEC="torch torchvision".
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# where torch comes from; on ARM (Raspberry Pi) PyPI's aarch64 torch is a CUDA build that pulls ~4 GB of
# nvidia-* and triton packages: make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu installs the
# CPU-only build instead (README, "Raspberry Pi 5 / ARM")
TORCH_INDEX ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.cpubone-installed

.PHONY: bench test setup clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e '.[all]'
	touch $(STAMP)

setup: $(STAMP)

bench: $(STAMP)
	$(BIN)/cpubone bench $(ARGS)

# one test process per core (pytest-xdist), each on one thread: the suite's processes do not share a core.
# Tests marked own_process (the torchrun DDP comparison, the digits training runs) run afterwards in a plain
# pytest: xdist workers waiting on them died in full runs; exit status 5 (none selected by ARGS) is fine for
# that second part only.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $$(nproc) --durations=15 -m "not own_process" $(ARGS)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m own_process $(ARGS) || [ $$? -eq 5 ]

clean:
	rm -rf $(VENV)
