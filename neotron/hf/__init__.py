"""Hugging Face interop: export (`neotron convert --format hf`), import (`--from-hf`), the
transformers classes of neotron's architectures, and `neotron.load_model`. Nothing heavy is
imported here: transformers loads only when one of these is used (docs/hf.md)."""
