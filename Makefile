# make test  : create .venv if missing, install CPU torch + megappo[test], the SGLang test
#              environments below, run pytest
# make sglang-env : only the SGLang environments (idempotent, stamp files)
# make demo  : the end-to-end demo (python -m megappo.demo)
# make demo-rlhf : the RLHF demo (python -m megappo.demo_rlhf: reward model, then PPO with it)
# make docs  : regenerate docs/config.md from the schema
# make lint  : byte-compile everything and check docs/config.md is in sync
#
# Every pip call sees PIP_CONSTRAINT=constraints.txt, which pins torch==2.13.0: an unpinned
# torch would pull the newest CUDA build (GBs). On these machines that pin resolves to the
# local CPU wheel; elsewhere pass TORCH_INDEX=https://download.pytorch.org/whl/cpu to get the
# CPU build. Installation runs once per change of setup.py / constraints.txt (stamp file).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU SGLang environment the real-engine / real-server tests and tools run in: its own venv,
# because sglang 0.5.23 pins transformers 5.19.0 (ours floats) and torch 2.14.1 (we keep the CPU
# torch 2.13.0: sglang goes in with --no-deps, measured to work). About 100-130 s and 3 GB.
# The .pth puts megappo/parallel/sglang_cpu/shims on its path: PyPI's CUDA-linked torchvision
# (which transformers imports there) needs the schema stand-in in every process of this venv.
SGLANG_VENV ?= .venv-sglang
SGLANG_PY := $(SGLANG_VENV)/bin/python
SGLANG_VENV_STAMP := $(SGLANG_VENV)/.installed
# The oldest supported SGLang (0.5.18) for the contract tests only: a --no-deps --target folder
# on top of .venv, with the transformers 5.12.1 it pins (it is imported, never run).
SGLANG_TARGET := $(VENV)/sglang-0.5.18
SGLANG_STAMP := $(SGLANG_TARGET)/.installed
PYTEST_ARGS ?=
DEMO_ARGS ?=
TORCH_INDEX ?=

export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: test install sglang-env demo demo-rlhf docs lint clean

test: $(STAMP) $(SGLANG_STAMP) $(SGLANG_VENV_STAMP)
	@MEGAPPO_SGLANG_PATH=$(CURDIR)/$(SGLANG_TARGET) MEGAPPO_SGLANG_PYTHON=$(CURDIR)/$(SGLANG_PY) \
	$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5): failing" >&2; fi; \
	exit $$rc

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): setup.py constraints.txt | $(PY)
	$(PY) -m pip install --no-input torch==2.13.0 $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(PY) -m pip install --no-input -e '.[test]'
	touch $@

sglang-env: $(SGLANG_STAMP) $(SGLANG_VENV_STAMP)

$(SGLANG_STAMP): tests/sglang-contract-requirements.txt | $(PY)
	$(PY) -m pip install --no-input --no-deps --upgrade --target $(SGLANG_TARGET) -r tests/sglang-contract-requirements.txt
	touch $@

$(SGLANG_VENV_STAMP): tests/sglang-cpu-requirements.txt setup.py constraints.txt
	test -x $(SGLANG_PY) || $(PYTHON) -m venv $(SGLANG_VENV)
	$(SGLANG_PY) -m pip install --no-input torch==2.13.0 $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(SGLANG_PY) -m pip install --no-input --no-deps -r tests/sglang-cpu-requirements.txt
	$(SGLANG_PY) -m pip install --no-input -e '.[test]'
	$(SGLANG_PY) -c 'import site, sys; open(site.getsitepackages()[0] + "/megappo_sglang_cpu_shims.pth", "w").write(sys.argv[1] + "\n")' \
	    $(CURDIR)/megappo/parallel/sglang_cpu/shims
	SGLANG_USE_CPU_ENGINE=1 $(SGLANG_PY) -c 'import sglang, sglang.srt.entrypoints.engine, transformers; print("sglang", sglang.__version__, "transformers", transformers.__version__)'
	touch $@

demo: $(STAMP)
	$(PY) -m megappo.demo $(DEMO_ARGS)

demo-rlhf: $(STAMP)
	$(PY) -m megappo.demo_rlhf $(DEMO_ARGS)

docs: $(STAMP)
	$(PY) -m megappo.config --markdown > docs/config.md

lint: $(STAMP)
	$(PY) -m compileall -q megappo tests tools
	$(PY) -m megappo.config --markdown --check docs/config.md

clean:
	rm -rf build *.egg-info

# make gpu-check : the prepared GPU check on a GPU machine (README "GPU check"); e.g.
#   make gpu-check GPU_CHECK_ARGS="--wheels wheels --out gpu_check.json"
GPU_CHECK_ARGS ?=
.PHONY: gpu-check
gpu-check:
	tools/gpu_check.sh $(GPU_CHECK_ARGS)
