"""The profile statistic: hand computation, batch invariance, planted differences, ranking methods."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from surgery import ModelOptions, SurgeryError, find_candidates, open_checkpoint
from surgery.analysis.profiling import profile
from surgery.analysis.ranking import build_manifest
from surgery.analysis.stats import load_stats
from tests.helpers import model_with_tokenizer

PROMPTS = [
    "What is 2+2?",
    "hi",
    "Count to ten, please.",
    "Name a prime number.",
    "x",
    "Add 17 and 25.",
    "A train leaves at noon.",
    "Why is the sky blue?",
]


def workload(tmp_path: Path, prompts: list[str]) -> str:
    path = tmp_path / "w.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p}) for p in prompts) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_with_tokenizer(tmp_path_factory.mktemp("m") / "model", 3)


def hand_statistic(model_dir: Path, prompts: list[str], max_new_tokens: int) -> dict[str, list[list[float]]]:
    """mean|y| at the last position of every forward pass of HF `generate`, per module and prompt."""
    lm = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    names = [n for n, m in lm.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    values: dict[str, list[list[float]]] = {n: [] for n in names}

    def hook(name: str):
        return lambda mod, inp, out: values[name][-1].append(out[0, -1].abs().double().mean().item())

    handles = [lm.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    for p in prompts:
        for n in names:
            values[n].append([])
        text = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")
        lm.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    for h in handles:
        h.remove()
    return values


def test_statistic_equals_hand_computation(tmp_path: Path, model: Path) -> None:
    prompts = PROMPTS[:3]
    stats = profile(model, workload(tmp_path, prompts), None, max_new_tokens=5, batch_size=2)
    hand = hand_statistic(model, prompts, 5)
    assert stats.steps.tolist() == [len(v) for v in hand["model.layers.0.mlp.up_proj"]]
    assert set(stats.mean) == set(hand) and len(hand) == 14
    for name, per_prompt in hand.items():
        flat = [v for row in per_prompt for v in row]
        assert stats.mean[name] == pytest.approx(sum(flat) / len(flat), rel=1e-6), name
        expected = torch.tensor([sum(r) / len(r) for r in per_prompt], dtype=torch.float64)
        assert torch.allclose(stats.per_prompt[name], expected, rtol=1e-6), name


def _first_new_token(model_dir: Path, prompt: str, step: int) -> int:
    lm = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")
    out = lm.generate(**ids, max_new_tokens=step + 1, do_sample=False, pad_token_id=tok.pad_token_id)
    new = out[0, ids["input_ids"].shape[1] :].tolist()
    return new[step]


def test_batch_size_invariance_with_finished_sequences(tmp_path: Path, model: Path) -> None:
    # Make the token one prompt emits at its 3rd step an EOS, so rows finish at different steps.
    local = shutil.copytree(model, tmp_path / "m")
    eos = _first_new_token(local, PROMPTS[0], 2)
    gen = json.loads((local / "generation_config.json").read_text())
    (local / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [eos, 2]}))
    w = workload(tmp_path, PROMPTS)
    one = profile(local, w, None, max_new_tokens=8, batch_size=1)
    eight = profile(local, w, None, max_new_tokens=8, batch_size=8)
    assert one.steps.tolist() == eight.steps.tolist()
    assert one.steps[0] <= 3 and one.steps.max() == 8, "EOS handling was not exercised"
    for name in one.mean:
        assert eight.mean[name] == pytest.approx(one.mean[name], rel=1e-4), name
        assert torch.allclose(eight.per_prompt[name], one.per_prompt[name], rtol=1e-4), name


def test_stats_file_is_deterministic_and_complete(tmp_path: Path, model: Path) -> None:
    w = workload(tmp_path, PROMPTS[:4])
    profile(model, w, tmp_path / "a.safetensors", max_new_tokens=3, batch_size=3)
    profile(model, w, tmp_path / "b.safetensors", max_new_tokens=3, batch_size=3)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    stats = load_stats(tmp_path / "a.safetensors")
    meta = stats.meta.to_dict()  # as the file's JSON holds it
    assert meta["model"]["fingerprint"] == open_checkpoint(model).fingerprint
    assert meta["workload"]["prompts"] == 4 and len(meta["workload"]["sha256"]) == 64
    assert meta["settings"] == {"max_new_tokens": 3, "chat": True, "dtype": "float32"}
    assert set(meta["versions"]) == {"surgery", "torch", "transformers"}
    assert stats.steps.tolist() == [3, 3, 3, 3]
    assert not list(tmp_path.glob(".*.tmp")), "temp file left behind"


def test_no_chat_changes_the_prompts(tmp_path: Path, model: Path) -> None:
    w = workload(tmp_path, PROMPTS[:2])
    chat = profile(model, w, None, max_new_tokens=2)
    plain = profile(model, w, None, max_new_tokens=2, options=ModelOptions(chat=False))
    assert plain.meta.settings.chat is False and chat.meta.settings.chat is True
    assert plain.mean != chat.mean


def test_offloaded_model_gives_the_same_statistic(tmp_path: Path, model: Path) -> None:
    w = workload(tmp_path, PROMPTS[:3])
    full = profile(model, w, None, max_new_tokens=3)
    # A budget far below the model's ~107 KB forces accelerate to keep weights on disk.
    offloaded = profile(model, w, None, max_new_tokens=3, max_memory="40KB")
    for name in full.mean:
        assert offloaded.mean[name] == pytest.approx(full.mean[name], rel=1e-6), name


def _manifest(method: str, source: Path, target: Path, src_stats=None, tgt_stats=None):
    src, tgt = open_checkpoint(source), open_checkpoint(target)
    return build_manifest(
        method, find_candidates(src, tgt), source=src, target=tgt, src_stats=src_stats, tgt_stats=tgt_stats
    )


def test_planted_last_down_proj_is_the_only_difference(planted) -> None:
    target, tgt_stats, make_source = planted
    name = "model.layers.3.mlp.down_proj"
    source, src_stats = make_source(name)
    man = _manifest("lae", source, target, src_stats, tgt_stats)
    assert man.modules[0].name == name and man.modules[0].score > 0
    for m in man.modules[1:]:
        assert abs(m.score) <= 1e-9 * max(m.a_src, m.a_tgt), m.name
    delta = _manifest("weight-delta", source, target)
    assert delta.modules[0].name == name and delta.modules[0].score == pytest.approx(3.0)
    assert all(m.score == 0 for m in delta.modules[1:])


def test_planted_v_proj_leaves_upstream_untouched(planted) -> None:
    target, tgt_stats, make_source = planted
    name = "model.layers.2.self_attn.v_proj"
    source, src_stats = make_source(name)
    scores = {m.name: m for m in _manifest("lae", source, target, src_stats, tgt_stats).modules}
    assert scores[name].score > 0
    upstream = [n for n in scores if n.startswith(("model.layers.0.", "model.layers.1."))]
    upstream += ["model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.k_proj"]
    assert len(upstream) == 16
    for n in upstream:
        assert abs(scores[n].score) <= 1e-9 * scores[n].a_tgt, n
    # Downstream modules do change: the planted difference propagates.
    assert scores["model.layers.2.self_attn.o_proj"].score != 0
    delta = _manifest("weight-delta", source, target)
    assert delta.modules[0].name == name and all(m.score == 0 for m in delta.modules[1:])


def test_ranking_methods(planted) -> None:
    target, tgt_stats, make_source = planted
    source, src_stats = make_source("model.layers.3.mlp.down_proj")
    for method in ("lae-abs", "lae-rel", "consistency"):
        man = _manifest(method, source, target, src_stats, tgt_stats)
        assert man.modules[0].name == "model.layers.3.mlp.down_proj", method
        assert man.method.name == method and man.workload.max_new_tokens == 1
    m = man.modules[0]
    rel = _manifest("lae-rel", source, target, src_stats, tgt_stats).modules[0]
    assert rel.score == pytest.approx(abs(m.a_src - m.a_tgt) / (m.a_src + m.a_tgt))
    src, tgt = open_checkpoint(source), open_checkpoint(target)
    compat = find_candidates(src, tgt)
    r1 = build_manifest("random", compat, source=src, target=tgt, seed=7)
    r2 = build_manifest("random", compat, source=src, target=tgt, seed=7)
    r3 = build_manifest("random", compat, source=src, target=tgt, seed=8)
    assert r1 == r2 and [m.name for m in r1.modules] != [m.name for m in r3.modules]
    assert r1.workload is None and r1.modules[0].a_src is None
    with pytest.raises(SurgeryError, match="method random needs --seed"):
        build_manifest("random", compat, source=src, target=tgt)
    with pytest.raises(SurgeryError, match="method lae needs --source-stats and --target-stats"):
        build_manifest("lae", compat, source=src, target=tgt)


def test_incomparable_stats_are_refused(tmp_path: Path, planted, model: Path) -> None:
    target, tgt_stats, make_source = planted
    source, _ = make_source("model.layers.3.mlp.down_proj")
    src, tgt = open_checkpoint(source), open_checkpoint(target)
    compat = find_candidates(src, tgt)
    longer = profile(source, workload(tmp_path, PROMPTS[:4]), None, max_new_tokens=2)
    with pytest.raises(SurgeryError, match="stats differ in settings max_new_tokens: source has 2, target has 1"):
        build_manifest("lae", compat, source=src, target=tgt, src_stats=longer, tgt_stats=tgt_stats)
    other = profile(source, workload(tmp_path, PROMPTS[4:]), None, max_new_tokens=1)
    with pytest.raises(SurgeryError, match="stats differ in workload sha256"):
        build_manifest("lae", compat, source=src, target=tgt, src_stats=other, tgt_stats=tgt_stats)
    with pytest.raises(SurgeryError, match=r"source stats were measured on .* not .*fingerprint differs"):
        build_manifest("lae", compat, source=src, target=tgt, src_stats=tgt_stats, tgt_stats=tgt_stats)
    small = profile(model, workload(tmp_path, PROMPTS[:4]), None, max_new_tokens=1)
    with pytest.raises(SurgeryError, match="stats cover different modules"):
        build_manifest("lae", compat, source=src, target=tgt, src_stats=small, tgt_stats=tgt_stats)
