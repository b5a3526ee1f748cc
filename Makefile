# make docs: the documentation site, offline, warnings as errors, into docs/_build/html
PYTHON ?= python

.PHONY: docs figures test

docs:
	$(PYTHON) -m sphinx -E -W --keep-going -q -b html docs docs/_build/html

figures:
	$(PYTHON) docs/figures.py

test:
	$(PYTHON) -m pytest -q tests
