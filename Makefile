# Two commands: `make test` and `make demo`. Both create (or reuse) .venv and install what they need.
# CPU (default): torch comes from the CPU wheel, `pip install torch==2.13.0`.
# GPU users: `make TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" test`
# or install torch yourself into .venv first; an installed torch that satisfies setup.cfg is kept.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) setup.cfg pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/saeft demo --output_dir outputs/demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) outputs build *.egg-info
