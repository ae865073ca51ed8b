# Entry points. Hydra overrides go straight on the command line: `make warmup stage.steps=20 deepspeed=zero2`
# (every command-line assignment except the Make variables below is handed to Hydra), or in ARGS="...".
VENV    ?= .venv
PYTHON  ?= $(VENV)/bin/python
NPROC   ?=
ARGS    ?=
MAKE_VARS := VENV PYTHON NPROC ARGS PYTEST_ARGS EVAL_MODEL EVAL_BASELINE TORCH_SPEC EXTRAS SRC DST RUN
HYDRA_ARGS := $(strip $(foreach a,$(MAKEOVERRIDES),$(if $(filter $(MAKE_VARS),$(firstword $(subst =, ,$(a)))),,$(a))) $(ARGS))
# CPU-only machines get the CPU build of torch (the CUDA wheels are several GB); GPU machines the default, TileLang
# and cuDNN's frontend for the sparse MLA kernels, and FlashMLA's forward (without its dependencies: its metadata
# asks for a newer torch than the one it loads on).
HAS_GPU := $(shell command -v nvidia-smi 2>/dev/null)
TORCH_SPEC ?= $(if $(HAS_GPU),torch,torch==2.13.0)
EXTRAS ?= $(if $(HAS_GPU),test$(comma)gpu,test)
comma := ,

# `make base` trains the embedded default's dense model (model=synthetic, into checkpoints/base/), or another of
# its shapes (model=synthetic_llama, into checkpoints/base-synthetic_llama/); a command line that names any other
# model, a model.path or a stage.init_from skips it.
BASE_MODEL := $(or $(patsubst model=%,%,$(filter model=synthetic%,$(HYDRA_ARGS))),synthetic)
BASE_RUN := $(if $(filter synthetic,$(BASE_MODEL)),base,base-$(BASE_MODEL))
BASE_EXPORT := checkpoints/$(BASE_RUN)/base/export/config.json
NEEDS_BASE := $(if $(filter model.path=% stage.init_from=%,$(HYDRA_ARGS))$(filter-out model=synthetic%,$(filter model=%,$(HYDRA_ARGS))),,$(BASE_EXPORT))
RUN_NAME := $(or $(patsubst run.name=%,%,$(lastword $(filter run.name=%,$(HYDRA_ARGS)))),default)
EVAL_MODEL ?= checkpoints/$(RUN_NAME)/sparse/export
EVAL_BASELINE ?= checkpoints/$(BASE_RUN)/base/export

.PHONY: setup test test-all base warmup sparse eval plan bench dequantize report

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q -e ".[$(EXTRAS)]"
	$(if $(HAS_GPU),$(PYTHON) -m pip install -q --no-deps sgl-flash-mla==1.0.0 || echo "[setup] FlashMLA's wheel did not install: sparse MLA's forward stays with TileLang")
	touch $@

# The suite CI runs (fast: minutes on 2 CPU cores).
test: setup
	$(PYTHON) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Everything, including the main job end to end against the README's figures (marked slow: ~10 minutes).
test-all: setup
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

# The embedded default's dense source model (cached: delete checkpoints/base/ to retrain).
base: setup $(BASE_EXPORT)
$(BASE_EXPORT):
	PYTHON="$(PYTHON)" NPROC=$(NPROC) launch/local.sh stage=base run.name=$(BASE_RUN) model=$(BASE_MODEL) \
		$(if $(filter base,$(MAKECMDGOALS)),$(filter-out model=% run.name=%,$(HYDRA_ARGS)))
	$(PYTHON) -m train.eval --model checkpoints/$(BASE_RUN)/base/export --out checkpoints/$(BASE_RUN)/base/eval.json

# Stage 1: dense warm-up of the indexers.
warmup: setup $(NEEDS_BASE)
	PYTHON="$(PYTHON)" NPROC=$(NPROC) launch/local.sh stage=warmup $(HYDRA_ARGS)

# Stage 2: sparse training, from the warm-up export of the same run.
sparse: setup $(NEEDS_BASE)
	PYTHON="$(PYTHON)" NPROC=$(NPROC) launch/local.sh stage=sparse $(HYDRA_ARGS)

# Held-out figures of a converted model next to its dense source (EVAL_MODEL=..., EVAL_BASELINE=... for others).
eval: setup
	$(PYTHON) -m train.eval --model "$(EVAL_MODEL)" --baseline "$(EVAL_BASELINE)" $(ARGS)

# A run's curves as a picture (loss, KL, recall, per-layer heat maps, lr, tokens/s, memory), from metrics.jsonl:
# `make report RUN=checkpoints/mine`; several runs on shared axes: RUN="checkpoints/a checkpoints/b".
RUN ?= checkpoints/default
report: setup
	$(PYTHON) -m train.report $(RUN) $(ARGS)

# What a stage costs, from shapes only: `make plan preset=paper model=deepseek_v3_671b run.plan_gpus=16`.
plan: setup
	$(PYTHON) -m train run.dry_run=true $(HYDRA_ARGS)

# An FP8 checkpoint (DeepSeek-V3.1's) as a bf16 copy to convert from: `make dequantize SRC=/ckpt/v3.1 DST=/ckpt/v3.1-bf16`.
dequantize: setup
	@test -n "$(SRC)" -a -n "$(DST)" || { echo "error: make dequantize needs SRC=<FP8 checkpoint directory> DST=<new directory>" >&2; exit 2; }
	$(PYTHON) -m train.dequantize "$(SRC)" "$(DST)"

# GPU kernels vs their PyTorch twins and SDPA, then whole training steps (bench/): JSON in bench.json, tables on stdout.
bench: setup
	$(PYTHON) -m bench $(ARGS)
