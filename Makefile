# Two commands do all the set-up:  `make reproduce`  and  `make test`.
# Both create (or reuse) the project-local virtual environment in .venv.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= default
STAMP := $(VENV)/.installed

.PHONY: reproduce test lint bench venv clean-runs

venv: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (set PYTHON=/path/to/python3.11)"; exit 2; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
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

bench: $(STAMP)
	for f in benchmarks/bench_*.py; do $(PY) $$f || exit 1; done

clean-runs:
	rm -rf runs
