"""peftcli: parameter-efficient fine-tuning from strict YAML recipes."""

__version__ = "0.1.0"
