# Two entry points: `make demo` (install + run a demo, no download) and `make test`.
PY ?= python3
PIP := $(PY) -m pip install --disable-pip-version-check -q

.PHONY: install demo test lint bench

install:
	@# torch first, pinned: the CPU wheel is on local disk; an unpinned resolve pulls CUDA.
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	$(PIP) -e ".[test]"
	$(PY) -m sparsa.kernels build || true
	@# rows per tile / prefetch measured on this machine and cached (speed only; ~10 s)
	$(PY) -m sparsa.kernels tune >/dev/null 2>&1 || true

demo: install
	$(PY) -m sparsa.cli demo

test: install
	$(PY) -m pytest -q -p no:cacheprovider

lint:
	$(PY) -m ruff check sparsa tests

bench: install
	$(PY) -m sparsa.cli bench --model mixtral-mini
