"""Training objectives: what the loss is. One module and one registration each (sft, dpo, orpo, simpo),
listed by `peft objectives` and chosen by the recipe's `objective:` section; the torch side of the preference
losses is in `pair_losses.py`, the loop's side in `train/preference.py`."""
