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
# the TFLite converter (extra [mobile]: litert-torch) pins typing_extensions below what the main env's
# packages need, so it gets an environment of its own: make mobile / make test-mobile (docs/deployment.md)
MOBILE_VENV ?= .venv-mobile
MOBILE_BIN := $(MOBILE_VENV)/bin
MOBILE_STAMP := $(MOBILE_VENV)/.cpubone-installed
# the converter, ONNX Runtime (the reference LiteRT is timed against), bench's plots and the test tools
MOBILE_EXTRAS := mobile,bench,deploy,test

.PHONY: bench test setup clean mobile test-mobile docs

# $(call venv,DIR,EXTRAS): a venv in DIR with torch as pinned above, then cpubone[EXTRAS] in editable mode
define venv
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -m pip install -q $(TORCH_SPEC) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(1)/bin/python -m pip install -q -e '.[$(2)]'
	touch $(1)/.cpubone-installed
endef

$(STAMP): pyproject.toml
	$(call venv,$(VENV),all)

$(MOBILE_STAMP): pyproject.toml
	$(call venv,$(MOBILE_VENV),$(MOBILE_EXTRAS))

setup: $(STAMP)

bench: $(STAMP)
	$(BIN)/cpubone bench $(ARGS)

# one test process per core (pytest-xdist), each on one thread: the suite's processes do not share a core.
# In full fresh-clone runs an xdist worker that waits on a training subprocess has died now and then ("node
# down", killed without any exit, signal or fault it could log; cause not found, never alone or in subsets):
# a test whose worker dies is run once more on a new worker (pytest-rerunfailures, worker crashes only; a
# test that fails or kills its worker again still fails). Tests marked own_process (the torchrun DDP
# comparison) run afterwards in a plain pytest; exit status 5 (none selected by ARGS) is fine for that part.
RERUN_CRASHED := --reruns 1 --only-rerun "worker .* crashed while running"
test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $$(nproc) --durations=15 -m "not own_process" $(RERUN_CRASHED) $(ARGS)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m own_process $(ARGS) || [ $$? -eq 5 ]

# the documentation site (mkdocs.yml over docs/, the API reference generated from the docstrings) into site/;
# strict: a broken link, a missing heading or a reference to a missing object fails the build
docs: $(STAMP)
	$(BIN)/mkdocs build --strict -d site

mobile: $(MOBILE_STAMP)

# what only the mobile env runs: the TFLite conversion (tests/test_tflite.py, the litert engine's fp32 and
# int8 checks, the torch-free predict of a .tflite); the same tests skip in the main env, which lacks litert-torch
test-mobile: $(MOBILE_STAMP)
	OMP_NUM_THREADS=1 $(MOBILE_BIN)/python -m pytest -q -k "litert or tflite or torch_free" \
		$(or $(ARGS),tests/test_tflite.py tests/test_engines.py)

clean:
	rm -rf $(VENV) $(MOBILE_VENV)
