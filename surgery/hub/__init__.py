"""Publishing to the Hugging Face Hub: `push` a transplant output (`publish.py`).

Hub repo ids as *inputs* are resolved in `surgery.checkpoints.hub_inputs`; the model card a
transplant writes is `surgery.transplants.card`.
"""

from surgery.hub.publish import check_push_options, make_api, push

__all__ = ["check_push_options", "make_api", "push"]
