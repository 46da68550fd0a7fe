# Two commands do all set-up on a fresh machine: `make run` and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
PYX    := $(wildcard *.pyx)
STAMP  := $(VENV)/.installed

.PHONY: run test unit check lint build clean system-deps bench

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

# Compiled extensions, rebuilt when any .pyx changes.
$(VENV)/.built: $(STAMP) $(PYX) setup.py
	$(PY) setup.py --quiet build_ext --inplace
	touch $@

build: $(VENV)/.built

system-deps:
	scripts/system-deps

test: system-deps build
	$(PY) -m pytest

# The fast loop: every test not marked integration or docker, wherever it lives under tests/ (moto's S3,
# in-memory fakes; no SeaweedFS, API process, loader or dockerd: tests/conftest.py keeps it so).
unit: build
	$(PY) -m pytest -q -m "not integration and not docker"

# ruff reads the Python files, cython-lint the compiled modules (it runs pycodestyle from PATH: the venv's).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/cython-lint $(PYX)

check: lint test

run: system-deps build
	$(PY) -m devstack run

bench: build
	$(PY) bench/crypto.py

clean:
	rm -rf build *.c *.so $(VENV)/.built
