# Two entry points (see README): `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
DEMO_OUT ?= demo_out

.PHONY: setup demo test lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# CPU torch first: an unpinned torch would pull a multi-GB CUDA build
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/scbranch demo --out $(DEMO_OUT) --overwrite

test: setup
	$(PY) -m pytest -q

lint: setup
	$(PY) -m pip install -q ruff && $(PY) -m ruff check scbranch tests benchmarks

clean:
	rm -rf $(DEMO_OUT) lightning_logs scvi_log .pytest_cache
