# The two commands of the README:
#   make notebooks   set up (venv, package, kernel) and execute every notebook in order, in place
#   make test        set up and run all tests (unit tests + nbval on the committed notebooks)
# Offline? Point the suite at a copy of the datasets: MERGELIB_DATA_ROOT=/path/to/datasets make ...

PYTHON   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
TORCH    ?= torch==2.14.1 torchvision==0.29.1
PROFILE  ?=
# papermill parameters: empty = the notebooks' defaults (PROFILE="auto"); e.g. make notebooks PROFILE=quick
PARAMS   := $(if $(PROFILE),-p PROFILE $(PROFILE),)
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))

.PHONY: setup notebooks test unit nbval lab clean-zoo

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH) -e ".[notebooks,test]"
	$(PY) -m ipykernel install --sys-prefix --name mergelib --display-name "Python (mergelib)" >/dev/null
	touch $@

setup: $(VENV)/.installed

notebooks: setup
	@for nb in $(NOTEBOOKS); do \
	  echo "== executing $$nb $(PARAMS)"; \
	  $(VENV)/bin/papermill --cwd notebooks --kernel python3 $(PARAMS) "$$nb" "$$nb" || exit 1; \
	done
	$(PY) tools/normalize_notebooks.py $(NOTEBOOKS)

test: setup
	$(PY) -m pytest tests $(NOTEBOOKS) --nbval-lax --nbval-current-env \
	  --nbval-sanitize-with tools/nbval_sanitize.cfg --nbval-cell-timeout=1200 -p no:cacheprovider

unit: setup
	$(PY) -m pytest tests -p no:cacheprovider

lab: setup
	$(PY) tools/make_lab_copies.py $(NOTEBOOKS)

clean-zoo:
	rm -rf data/zoo
