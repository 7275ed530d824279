"""Multi-process launching: accelerate presets shipped with the package, and `peft train --launch`."""
