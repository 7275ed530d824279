# The two commands of the README (quickstart, test) set everything up first (idempotent, fast when done).
# test-latest and lock keep the tested stack (constraints/tested.txt) current; see the README.
.PHONY: setup quickstart test lint test-latest lock

setup:
	bash scripts/setup.sh

quickstart: setup
	.venv/bin/peft train recipes/quickstart.yaml --overwrite

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

# A green run records the environment it passed in, for `make lock VENV=.venv`.
test: lint
	rm -f .venv/green-freeze.txt
	.venv/bin/python -m pytest -q -ra --durations=25
	.venv/bin/python -m pip freeze --all > .venv/green-freeze.txt

test-latest:
	bash scripts/test-latest.sh

lock:
	bash scripts/refresh-lock.sh $(or $(VENV),.venv-latest)
