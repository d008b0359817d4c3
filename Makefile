# `make demo`: SANO end to end on the embedded data.  `make test`: the test suite.
# Both create (or reuse) a local virtual environment in .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml | cksum | cut -d' ' -f1)
WORKDIR ?= workdirs/demo

COMPARE_ROOT ?= workdirs/compare
COMPARE_CONFIG ?= configs/demo.py

.PHONY: demo test compare install clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) run_demo.py --workdir=$(WORKDIR)

# Table 1 on the embedded data: every method trained like the demo (same data, steps, batch), evaluated
# the same way, one table (Markdown + JSON) and one figure in $(COMPARE_ROOT).
compare: $(STAMP)
	$(PY) run_compare.py --config=$(COMPARE_CONFIG) --root=$(COMPARE_ROOT)

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadscope --no-loadscope-reorder --durations=25 -q

clean:
	rm -rf $(VENV) workdirs
