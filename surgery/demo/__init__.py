"""The demo: the whole pipeline on a real model from PyPI.

- `run.py`: `run_demo`, import -> pair -> analyze -> transplant -> verify -> eval -> report.
- `pairs.py`: the seeded fine-tune recipes that build its source/target pairs.
"""

from surgery.demo.run import DemoSettings, run_demo, smollm2_gguf

__all__ = ["DemoSettings", "run_demo", "smollm2_gguf"]
