# The two commands of the README. Both set everything up first (idempotent, fast when done).
.PHONY: setup quickstart test lint

setup:
	bash scripts/setup.sh

quickstart: setup
	.venv/bin/peft train recipes/quickstart.yaml --overwrite

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

test: lint
	.venv/bin/python -m pytest -q -ra
