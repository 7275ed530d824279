"""Training objectives: what the loss is. One module and one registration each (sft, dpo, orpo, simpo, kto),
listed by `peft objectives` and chosen by the recipe's `objective:` section; the torch side of the preference
losses is in `pair_losses.py` and `kto_loss.py`, the loop's side in `train/preference.py` and
`train/unpaired.py`."""
