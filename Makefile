# Entry points. Hydra overrides go straight on the command line: `make warmup stage.steps=20 model=tiny`
# (every command-line assignment except the Make variables below is handed to Hydra), or in ARGS="...".
VENV    ?= .venv
PYTHON  ?= $(VENV)/bin/python
NPROC   ?=
ARGS    ?=
MAKE_VARS := VENV PYTHON NPROC ARGS PYTEST_ARGS
HYDRA_ARGS := $(strip $(foreach a,$(MAKEOVERRIDES),$(if $(filter $(MAKE_VARS),$(firstword $(subst =, ,$(a)))),,$(a))) $(ARGS))
# CPU-only machines get the CPU build of torch (the CUDA wheels are several GB); GPU machines the default.
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)

.PHONY: setup test test-all

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q -e ".[test]"
	touch $@

# The suite CI runs (fast: minutes on 2 CPU cores).
test: setup
	$(PYTHON) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Everything, including end-to-end stage runs marked slow.
test-all: setup
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)
