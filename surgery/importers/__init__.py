"""Other weight formats into safetensors checkpoint folders.

- `from_gguf.py`: `import_gguf`, a GGUF file (de-quantised) into a folder with config and tokenizer.
- `from_pickle.py`: `import_pickle`, pickle weights, only with `allow_pickle` and `weights_only=True`.
"""
