# Set-up is idempotent: `make demo` and `make test` create .venv and install segkit on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.segkit-installed
# The torch / torchvision pair segkit is tested with; override to use another compatible pair.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
# Where torch comes from: empty for the package index's default build; on a machine without a GPU,
# TORCH_INDEX=https://download.pytorch.org/whl/cpu installs the CPU-only build (no CUDA libraries).
TORCH_INDEX ?=

.PHONY: install demo test test-slow docs clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip uninstall --quiet --yes segkit 2>/dev/null || true  # the distribution's former name
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Train the quickstart detector on the generated Shapes data and print its COCO metrics.
demo: $(STAMP)
	$(VENV)/bin/segkit train configs/quickstart.yaml

# The default test suite (slow tests excluded).
test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# The documentation site: generated reference pages, then a strict build into site/ (open site/index.html).
# NO_MKDOCS_2_WARNING silences Material's banner announcing its end of life (May 2027) on every build.
docs: $(STAMP)
	$(PY) tools/gen_docs.py && NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

clean:
	rm -rf work_dirs .pytest_cache
