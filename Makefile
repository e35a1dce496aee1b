# make test  : create .venv if missing, install CPU torch + megappo[test], run pytest
# make demo  : the end-to-end demo (python -m megappo.demo)
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
SGLANG_TARGET := $(VENV)/sglang-target
SGLANG_STAMP := $(SGLANG_TARGET)/.installed
PYTEST_ARGS ?=
DEMO_ARGS ?=
TORCH_INDEX ?=

export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: test install demo docs lint clean

test: $(STAMP) $(SGLANG_STAMP)
	@MEGAPPO_SGLANG_PATH=$(CURDIR)/$(SGLANG_TARGET) $(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5): failing" >&2; fi; \
	exit $$rc

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): setup.py constraints.txt | $(PY)
	$(PY) -m pip install --no-input torch==2.13.0 $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(PY) -m pip install --no-input -e '.[test]'
	touch $@

# SGLang's Python package for the adapter's contract tests (CPU can import, not run, it).
$(SGLANG_STAMP): tests/sglang-contract-requirements.txt | $(PY)
	$(PY) -m pip install --no-input --no-deps --upgrade --target $(SGLANG_TARGET) -r tests/sglang-contract-requirements.txt
	touch $@

demo: $(STAMP)
	$(PY) -m megappo.demo $(DEMO_ARGS)

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
