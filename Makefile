# `make demo`: SANO end to end on the embedded data.  `make test`: the test suite.
# Both create (or reuse) a local virtual environment in .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml | cksum | cut -d' ' -f1)
WORKDIR ?= workdirs/demo

.PHONY: demo test install clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) run_demo.py --workdir=$(WORKDIR)

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile -q

clean:
	rm -rf $(VENV) workdirs
