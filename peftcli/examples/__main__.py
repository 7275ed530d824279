"""`python -m peftcli.examples`: prepare the example model and data in the cache."""

from peftcli.examples.assets import prepare_all

prepare_all()
