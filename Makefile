# Set-up and common commands. Each target creates or reuses the virtual environment in
# $(VENV) and installs the package with its test and docs extras before running.
#
# TORCH_SPEC pins the tested PyTorch release; pass TORCH_SPEC="torch torchvision" (or a
# CUDA-specific index through PIP_INDEX_URL) to install another build.

VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# The shared torch hub cache holds torchvision's MobileNetV2 weights for offline runs.
ifneq ($(wildcard ../shared/torch-hub),)
export TORCH_HOME ?= $(abspath ../shared/torch-hub)
endif

.PHONY: install demo test docs cifar clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[test,docs]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m spherical_cl.train --config configs/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q
	$(MAKE) docs

docs: $(STAMP)
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html

cifar: $(STAMP)
	$(PY) -m spherical_cl.train --config configs/cifar100_mobilenetv2.yaml

clean-venv:
	rm -rf $(VENV)
