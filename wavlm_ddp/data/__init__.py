"""Manifests and HF datasets, audio reading, the tokenizer and the data check."""
