# Two entry points (see README): `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
DEMO_OUT ?= demo_out

.PHONY: setup demo test docs lint bench-smoke clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build. Where pip's
	# own sources hold no CPU wheel (plain PyPI on Linux has the CUDA one), pass
	# TORCH_INDEX=https://download.pytorch.org/whl/cpu
	$(PIP) install torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/scbranch demo --out $(DEMO_OUT) --overwrite

test: setup
	$(PY) -m pytest -q

$(VENV)/.docs-installed: pyproject.toml $(VENV)/.installed
	$(PIP) install -e ".[docs]"
	touch $@

# the documentation site; warnings (a broken cross-reference among them) fail the build
docs: $(VENV)/.docs-installed
	rm -rf docs/generated docs/_build
	$(VENV)/bin/sphinx-build -W --keep-going -q -b html docs docs/_build/html
	@echo "docs: open docs/_build/html/index.html"

lint: setup
	$(PY) -m pip install -q ruff && $(PY) -m ruff check scbranch tests benchmarks docs && $(PY) -m ruff format --check scbranch tests benchmarks docs/conf.py docs/_ext

# every benchmark's fast mode, in a clean clone of the last commit (about 45 min on 2 cores):
# it must exit 0 and write nothing into the tree (benchmarks/smoke.py)
bench-smoke: setup
	$(PY) benchmarks/smoke.py

clean:
	rm -rf $(DEMO_OUT) lightning_logs scvi_log .pytest_cache docs/_build docs/generated
