# Two entry points, each self-contained: it creates its own virtual environment and installs
# what it needs. torch goes in first so that pip never resolves a plain `torch` requirement to
# the multi-GB CUDA wheels; override TORCH_SPEC for a GPU build, e.g.
#   make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# default: 900 scans, about 15 minutes of stages on 2 cores; large: 2700 scans (README, "make demo DEMO_SCALE=large")
DEMO_SCALE ?= default
DEMO_DIR ?= $(if $(filter default,$(DEMO_SCALE)),demo_output,demo_output_$(DEMO_SCALE))
# a second image encoder pretrained and evaluated beside the first, e.g. make demo DEMO_COMPARE=slicefusion_small
DEMO_COMPARE ?=
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test venv label clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

venv: $(PY)
	$(PIP) install --quiet $(TORCH_SPEC)

# The main job: the synthetic demo cohort through every stage, with a report in $(DEMO_DIR)/.
demo: venv
	$(PIP) install --quiet -e ".[demo]"
	$(PY) -m workflows.demo --output_dir $(DEMO_DIR) --scale $(DEMO_SCALE) $(if $(DEMO_COMPARE),--compare_model_config $(DEMO_COMPARE))

# The test suite (CPU, tiny generated data). pytest exits 5 when it collected no test:
# that is a failure here, never a silent pass.
# The MONAI Label app's tests need the label environment (`make label`); they skip, with the reason, without it.
test: venv label
	$(PIP) install --quiet -e ".[test]"
	$(PY) -m pytest -q --timeout 900 tests

# The MONAI Label app (monailabel_app/README.md) in its own environment: MONAI Label 0.8.5 imports torchvision, and
# the only torchvision that imports on this kind of machine (x86_64, CPU) is PyPI's 0.29.1 beside torch 2.14.1, a
# CUDA build of about 5.5 GB that also runs on the CPU. The core environment keeps TORCH_SPEC.
LABEL_VENV ?= .venv-label
LABEL_TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
LABEL_PY := $(LABEL_VENV)/bin/python

$(LABEL_PY):
	$(PYTHON) -m venv $(LABEL_VENV)
	$(LABEL_PY) -m pip install --quiet --upgrade pip

label: $(LABEL_PY)
	$(LABEL_PY) -m pip install --quiet $(LABEL_TORCH_SPEC)
	$(LABEL_PY) -m pip install --quiet -e ".[label]"
	$(LABEL_PY) -m pip install --quiet --no-deps monailabel==0.8.5 pydicom-seg==0.4.1
	$(LABEL_PY) -c "import torchvision, monailabel.app, monailabel.tasks.train.bundle"

clean:
	rm -rf $(VENV) $(LABEL_VENV) $(DEMO_DIR)
