"""Stage 2, transplant: write the patched checkpoint, describe it, and check it.

- `write.py`: `transplant`: plan the output from the headers, then stream the bytes.
- `card.py`: the model card (`README.md`) written into every output.
- `verify.py`: `verify`: every output byte against the target and source.
"""
