"""Data: load sources, render formats into token ids and labels, collate batches."""
