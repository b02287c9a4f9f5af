# Two entry points, each self-contained: it creates its own virtual environment and installs
# what it needs. torch goes in first so that pip never resolves a plain `torch` requirement to
# the multi-GB CUDA wheels; override TORCH_SPEC for a GPU build, e.g.
#   make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= demo_output
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test venv clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

venv: $(PY)
	$(PIP) install --quiet $(TORCH_SPEC)

# The main job: the synthetic demo cohort through every stage, with a report in $(DEMO_DIR)/.
demo: venv
	$(PIP) install --quiet -e ".[demo]"
	$(PY) -m workflows.demo --output_dir $(DEMO_DIR)

# The test suite (CPU, tiny generated data). pytest exits 5 when it collected no test:
# that is a failure here, never a silent pass.
test: venv
	$(PIP) install --quiet -e ".[test]"
	$(PY) -m pytest -q --timeout 900 tests

clean:
	rm -rf $(VENV) $(DEMO_DIR)
