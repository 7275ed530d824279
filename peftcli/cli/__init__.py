"""The `peft` command line: parsing and printing only; the work lives in the other packages."""
