# Two commands do all the set-up:  `make reproduce`  and  `make test`.
# Both create (or reuse) the project-local virtual environment in .venv.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= default
STAMP := $(VENV)/.installed

.PHONY: reproduce test lint bench venv clean-runs report serve

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

## Regenerate every figure and table of a profile (default: the embedded default data set).
reproduce: $(STAMP)
	$(PY) -m lwcam.pipeline run --profile $(PROFILE)

## The whole test suite: ruff, mypy, unit tests and every >>> example, then the notebooks under nbval (quick profile).
test: $(STAMP)
	$(PY) -m ruff check lwcam tests benchmarks
	$(PY) -m mypy
	$(PY) -m pytest -q --doctest-modules lwcam tests
	$(PY) -m pytest -q --nbval-lax --nbval-current-env -p no:cacheprovider notebooks

## The results as a static site: site/index.html (site/<profile>/ for other profiles), from runs/<profile>/notebooks;
## then, where Debian's chromium is installed, every page checked in it and the landing page's screenshot saved.
report: $(STAMP)
	$(PY) -m lwcam.report build --profile $(PROFILE)
	@if [ -x /usr/bin/chromium ]; then $(PY) -m lwcam.report check --profile $(PROFILE); \
	else echo "report: /usr/bin/chromium not found; the site is built but not checked in a browser"; fi

## Serve the profile's black box on http://127.0.0.1:$(PORT)/v2/models/blackbox (Open Inference Protocol, MLServer).
PORT ?= 8080
serve: $(STAMP)
	$(VENV)/bin/lwcam serve --profile $(PROFILE) --port $(PORT) --any-size

bench: $(STAMP)
	for f in benchmarks/bench_*.py; do $(PY) $$f || exit 1; done

clean-runs:
	rm -rf runs
