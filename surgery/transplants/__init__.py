"""Stage 2, transplant: choose the modules, plan and write the patched checkpoint (or a patch), describe it, check it.

- `selection.py`: `select_transplant`: the inputs opened and checked, the modules chosen, their provenance.
- `plan.py`: `WritePlan`: every output file, and where each of its bytes comes from, before a byte is written.
- `write.py`: `transplant`, and the one executor of a write plan (shared by `apply` and `write_patch`).
- `command.py`: what `surgery transplant` makes: a checkpoint, a patch, or only the plan (`--dry-run`).
- `patch.py`: `write_patch` (only the selected tensors) and `open_patch` (a patch folder read back and checked).
- `apply.py`: `apply` (a patch onto its target as a checkpoint, or `--revert`) and `apply_patch` (in memory).
- `records.py`: `transplant.json` and `patch.json`, typed.
- `card.py`: the model card (`README.md`) written into every output and patch.
- `summaries.py`: the eval summaries a card may carry, refused when they measured another model.
- `verify.py`: `verify`: every output byte against the target and source.
"""
