"""Using a trained run: load it (base + adapter, or a merged model), score it, answer prompts, chat with it."""
