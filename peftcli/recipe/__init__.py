"""Recipes: YAML files validated by strict pydantic models (`schema`), loaded by `load`."""
