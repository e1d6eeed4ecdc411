# Two entry points (see README):  make demo   |   make test
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEMO   ?= data/demo

.PHONY: demo test venv lint clean

# Create or refresh the virtual environment and install bat-jax with its dev tools.
venv:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'

# The main job on the embedded synthetic dataset: prepare spectrogram shards and print a summary.
demo: venv
	$(VENV)/bin/bat-jax prepare --source synthetic --out $(DEMO)

# The whole test suite.
test: venv
	$(PY) -m pytest -n 2 -q

lint: venv
	$(VENV)/bin/ruff check bat_jax tests benchmarks
	$(VENV)/bin/ruff format --check bat_jax tests benchmarks

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
