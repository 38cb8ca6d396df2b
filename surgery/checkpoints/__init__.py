"""Checkpoint folders: reading, validating and writing them, with no model in memory.

- `header.py`: the safetensors header format, parsed strictly.
- `files.py`: the names of a folder's files, and which ones are copied along with the weights.
- `hub_inputs.py`: Hub repo ids (`org/name[@revision]`) as inputs, through the local cache.
- `folder.py`: open a folder (or a resolved repo id), validate every shard, fingerprint it.
- `candidates.py`: which modules can move between two checkpoints, and why the others cannot.
- `streaming.py`: bounded-memory byte movement between safetensors files.
- `staging.py`: atomic outputs (temp folder + rename), locks, free-space checks.
- `options.py`: how a checkpoint is loaded and prompted (`ModelOptions`).
- `loading.py`: load a checkpoint as a transformers model and tokenizer (needs torch).
"""
