"""One options object, one argument order (issue 26 item 3): every analysis and evaluation function takes
`options: ModelOptions` instead of its fields, and `source=`/`target=` only by keyword."""

from __future__ import annotations

import inspect
import weakref
from pathlib import Path

import pytest

from surgery import ModelOptions

OPTION_FIELDS = {"dtype", "chat", "trust_remote_code", "progress", "device"}


def _functions() -> dict:
    from surgery.analysis.analyze import analyze
    from surgery.analysis.profiling import profile
    from surgery.analysis.rank import rank
    from surgery.analysis.ranking import build_manifest
    from surgery.evaluation.analyze_select import analyze_and_select
    from surgery.evaluation.runner import evaluate
    from surgery.evaluation.select import check_auto_k, choose_k
    from surgery.evaluation.sweep import sweep

    return {
        f.__name__: f
        for f in (profile, analyze, rank, build_manifest, analyze_and_select, evaluate, check_auto_k, choose_k, sweep)
    }


@pytest.mark.parametrize("name", sorted(_functions()))
def test_options_come_as_one_object_and_the_pair_by_keyword(name: str) -> None:
    params = inspect.signature(_functions()[name]).parameters
    assert not OPTION_FIELDS & set(params), f"{name} takes ModelOptions' fields one by one"
    assert "options" in params, f"{name} takes no options: ModelOptions"
    for role in ("source", "target"):
        if role in params:
            assert params[role].kind is inspect.Parameter.KEYWORD_ONLY, f"{name}: {role} is positional"


def test_with_model_frees_the_model_before_it_returns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The one loader of profile, eval, select and sweep: work's result comes back, and nothing keeps the model."""
    import transformers

    from surgery.checkpoints import loading

    class Fake:
        def eval(self) -> Fake:
            return self

    seen: list[dict] = []
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", lambda path, **kw: seen.append(kw) or Fake()
    )
    refs: list[weakref.ref] = []

    def work(model: Fake) -> str:
        refs.append(weakref.ref(model))
        return "done"

    options = ModelOptions(dtype="float32", device="cpu")
    assert loading.with_model(tmp_path, options, work) == "done"
    assert refs[0]() is None
    assert loading.with_model(tmp_path, options, work, max_memory="1GiB") == "done"
    folder = Path(seen[1]["offload_folder"])
    assert folder.name.startswith("surgery-offload-") and not folder.exists()
