# Two commands that work on a fresh machine (see README):
#   make tour   -- create .venv, install fewer, prepare the offline data, run the tour, write reports/tour/
#   make test   -- create .venv, install fewer with test extras, prepare the data, run the test suite
# TORCH_SPEC picks the torch build: the default is the CPU build; on a GPU machine pass e.g. TORCH_SPEC=torch
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.6.0
PY := $(VENV)/bin/python

.PHONY: setup data tour test clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" "$(TRITON_SPEC)"
	$(PY) -m pip install -q -e ".[all]"
	touch $@

setup: $(VENV)/.installed

data: setup
	$(PY) -m fewer data prepare

tour: data
	$(PY) -m fewer tour --out reports/tour

test: data
	TRITON_INTERPRET=1 $(PY) -m pytest -q -ra tests

clean:
	rm -rf $(VENV) data reports runs
