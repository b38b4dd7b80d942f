# Two commands do all the set-up:  `make reproduce`  and  `make test`.
# Both create (or reuse) the project-local virtual environment in .venv.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= default
STAMP := $(VENV)/.installed

.PHONY: reproduce evaluate test lint bench venv clean-runs report serve docs

venv: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (set PYTHON=/path/to/python3.11)"; exit 2; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,serve]"
	# Quantus (the randomisation cross-check) asks for opencv-python, which would overwrite the
	# headless OpenCV that grad-cam uses in the same cv2 folder; it runs on the headless one.
	$(PY) -m pip install --quiet --no-deps quantus==0.6.0 cachetools
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

## Regenerate every figure and table of a profile (default: the embedded default data set), then the README and docs/.
## NPROC=2 shards T3's and T4's explanations and measures (notebooks 04 and 05) over 2 processes on this machine.
NPROC ?= 1
reproduce: $(STAMP)
	$(PY) -m lwcam.study run --profile $(PROFILE) --nproc $(NPROC)
	$(PY) -m lwcam.study.docs

## A stage's per-image rows and tables sharded over NPROC processes on this machine. STAGE=t3 (the default):
## T3's explanations and games, T3_methods and T3_claim (notebook 04's rows); STAGE=t2: T2's per-layer games,
## T2_layers (notebook 03's rows); STAGE=t4: the scorecard's T4 tables (notebook 05's); STAGE=all: each in turn. The notebooks make the figures. Across machines see
## docs/distributed.md.
STAGE ?= t3
evaluate: $(STAMP)
	$(PY) -m lwcam.study evaluate --profile $(PROFILE) --nproc $(NPROC) --stage $(STAGE)

## The README and docs/*.md, rendered from docs/templates/ and the tables under reports/ (every profile's).
docs: $(STAMP)
	$(PY) -m lwcam.study.docs

## The whole test suite: ruff, mypy, unit tests and every >>> example, then the notebooks under nbval (quick profile).
## The browser tests find a headless Chromium or install one (tests/conftest.py, fixture `chromium`: Debian's
## chromium as root, else Playwright's); where none can be had they skip, and -rs prints why (on CI=true they fail).
test: $(STAMP)
	$(PY) -m ruff check lwcam tests benchmarks
	$(PY) -m mypy
	$(PY) -m pytest -q -rs --doctest-modules lwcam tests
	$(PY) -m pytest -q --nbval-lax --nbval-current-env -p no:cacheprovider notebooks

## The results as a static site: site/index.html (site/<profile>/ for other profiles), from runs/<profile>/notebooks;
## then, where a Chromium is installed (Debian's or Playwright's), every page checked in it and the landing page's
## screenshot saved. A notebook that raised is marked on the site and fails the target.
report: $(STAMP)
	$(PY) -m lwcam.study.report build --profile $(PROFILE)
	@if $(PY) -c "import sys; from lwcam.study.report import find_browser; sys.exit(find_browser() is None)"; then \
	$(PY) -m lwcam.study.report check --profile $(PROFILE); \
	else echo "report: no Chromium found (apt-get install chromium, or $(PY) -m playwright install chromium);" \
	"the site is built but not checked in a browser"; fi

## Serve the profile's black box on http://127.0.0.1:$(PORT)/v2/models/blackbox (Open Inference Protocol, MLServer).
PORT ?= 8080
serve: $(STAMP)
	$(VENV)/bin/lwcam serve --profile $(PROFILE) --port $(PORT) --any-size

bench: $(STAMP)
	for f in benchmarks/bench_*.py; do $(PY) $$f || exit 1; done

clean-runs:
	rm -rf runs
