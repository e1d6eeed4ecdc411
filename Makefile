# Two entry points (see README):  make demo   |   make test
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEMO   ?= data/demo

.PHONY: demo test venv venv-test lint clean

# torch is only an optional extra (reading *.pt checkpoints); the tests need it for the .pt import
# checks. A CPU build is enough: override TORCH to pick another wheel, e.g. TORCH='torch==2.9.1'.
TORCH  ?= torch==2.13.0

# Create or refresh the virtual environment and install bat-jax with its dev tools.
venv:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip
	$(PY) -m pip install -qq -e '.[dev]'

# The test environment: the above plus torch (CPU) for the *.pt checkpoint tests, libtpu (the `tpu` extra)
# and JAX's CUDA plugin (the `gpu-compile` extra) for the TPU and GPU compile-check tests.
venv-test: venv
	$(PY) -c 'import torch' 2>/dev/null || $(PY) -m pip install -qq '$(TORCH)'
	$(PY) -c 'import libtpu' 2>/dev/null || $(PY) -m pip install -qq -e '.[tpu]'
	$(PY) -c 'import jax_plugins.xla_cuda12' 2>/dev/null || $(PY) -m pip install -qq -e '.[gpu-compile]'

# The main job on the embedded synthetic dataset: prepare spectrogram shards, pretrain the tiny BAT on them
# (256-frame crops so that 2 CPU cores finish in minutes), print the first and last loss, the workdir and the
# TensorBoard command; then probe the encoder it just pretrained with CGP and a linear probe (test accuracy,
# layer gates in $(RUN)-probe/). Run again: prepare reuses its shards, pretrain resumes, probe runs anew.
RUN    ?= runs/demo
demo: venv
	$(VENV)/bin/bat-jax prepare --source synthetic --out $(DEMO)
	$(VENV)/bin/bat-jax pretrain --config configs/pretrain/tiny.py --workdir $(RUN) \
	  --config.data.root=$(DEMO) --config.frames=256
	$(PY) -m bat_jax.train.metrics $(RUN)
	$(VENV)/bin/bat-jax probe --config configs/probe/synthetic.py --workdir $(RUN)-probe --overwrite \
	  --config.encoder.path=$(RUN) --config.data.root=$(DEMO)

# The whole test suite.
test: venv-test
	$(PY) -m pytest -n 2 -q

lint: venv
	$(VENV)/bin/ruff check bat_jax tests benchmarks
	$(VENV)/bin/ruff format --check bat_jax tests benchmarks

clean:
	rm -rf $(VENV) $(DEMO) $(RUN) $(RUN)-probe .pytest_cache
