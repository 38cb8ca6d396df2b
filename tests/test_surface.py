"""One consistent command surface: the same flags, defaults and output rules across commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from surgery import ModelOptions, open_checkpoint
from surgery.cli.options import size
from tests.helpers import cli, make_model, tree_digest, write_manifest


def test_compat_takes_s_and_t_like_every_other_command(sharded_pair: tuple[Path, Path]) -> None:
    source, target = sharded_pair
    flags = cli("compat", "-s", source, "-t", target)
    positional = cli("compat", source, target)
    assert flags.exit_code == 0 and flags.output == positional.output
    assert "candidate model.layers.0.self_attn.q_proj" in flags.output
    both = cli("compat", source, target, "-s", source)
    assert both.exit_code == 2 and "either as SOURCE TARGET or with -s/-t" in both.stderr
    one = cli("compat", "-s", source)
    assert one.exit_code == 2 and "needs both checkpoints" in one.stderr


def test_verify_takes_its_inputs_from_transplant_json(tmp_path: Path, sharded_pair: tuple[Path, Path]) -> None:
    source, target = sharded_pair
    out = tmp_path / "out"
    assert (
        cli("transplant", "-t", target, "-s", source, "-o", out, "--module", "model.layers.1.mlp.*", "-q").exit_code
        == 0
    )
    result = cli("verify", out)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("ok: ")
    # A recorded input that is gone is named, with the flag that replaces it.
    record = json.loads((out / "transplant.json").read_text())
    record["source"]["path"] = str(tmp_path / "gone")
    (out / "transplant.json").write_text(json.dumps(record))
    gone = cli("verify", out)
    assert (
        gone.exit_code == 2 and f"the source recorded in transplant.json, {tmp_path / 'gone'}, is gone" in gone.stderr
    )
    assert cli("verify", out, "-s", source).exit_code == 0


def test_transplant_reports_the_bytes_from_the_source_and_in_all(
    tmp_path: Path, sharded_pair: tuple[Path, Path]
) -> None:
    source, target = sharded_pair
    out = tmp_path / "out"
    result = cli("transplant", "-t", target, "-s", source, "-o", out, "--module", "model.layers.1.mlp.down_proj", "-q")
    assert result.exit_code == 0, result.output
    moved = open_checkpoint(target).tensors["model.layers.1.mlp.down_proj.weight"].info.nbytes
    total = open_checkpoint(target).total_bytes
    assert f"1 modules (1 tensors, {size(moved)}) from the source; {size(total)} in all" in result.output
    assert size(moved) == "8.0 KiB" and size(3 * 2**20) == "3.0 MiB" and size(100) == "100 B"


def test_every_file_output_refuses_to_replace_without_overwrite(tmp_path: Path) -> None:
    """profile, manifest (and so analyze, through the same check) refuse an existing -o, as transplant does."""
    source, target = make_model(tmp_path / "s", 1), make_model(tmp_path / "t", 2)
    manifest = write_manifest(tmp_path / "m.json", source, target)
    before = manifest.read_text()
    args = ["manifest", "--method", "weight-delta", "-s", source, "-t", target, "-o", manifest]
    refused = cli(*args)
    assert refused.exit_code == 2
    assert refused.stderr == f"error: output {manifest} already exists; choose a new path or pass --overwrite\n"
    assert manifest.read_text() == before
    replaced = cli(*args, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert json.loads(manifest.read_text())["method"]["name"] == "weight-delta"
    digest = tree_digest(tmp_path)
    stats = tmp_path / "m.json"
    profiled = cli("profile", target, "-w", tmp_path / "absent.jsonl", "-o", stats)
    assert profiled.exit_code == 2 and "already exists; choose a new path or pass --overwrite" in profiled.stderr
    analyzed = cli("analyze", "-s", source, "-t", target, "-w", tmp_path / "absent.jsonl", "-o", stats)
    assert analyzed.exit_code == 2 and "already exists; choose a new path or pass --overwrite" in analyzed.stderr
    assert tree_digest(tmp_path) == digest


def test_transplant_warns_about_unrelated_configs_casts_and_a_no_op(tmp_path: Path, capfd) -> None:
    import torch

    target = make_model(tmp_path / "t", 1, dtype=torch.bfloat16)
    other = make_model(tmp_path / "o", 2, vocab_size=256)
    result = cli("transplant", "-t", target, "-s", other, "-o", tmp_path / "out", "--module", "model.layers.1.mlp.*")
    assert result.exit_code == 0, result.output
    assert "warning: the configs differ (source vs target): vocab_size (256 vs 128); are these models related?" in (
        result.stderr
    )
    assert "note: 3 tensors cast from the source's F32 to the target's BF16" in result.stderr
    same = cli("transplant", "-t", target, "-s", target, "-o", tmp_path / "same", "--module", "model.layers.1.mlp.*")
    assert same.exit_code == 0 and "source and target are the same checkpoint" in same.stderr
    quiet = cli("transplant", "-t", target, "-s", make_model(tmp_path / "s", 3, dtype=torch.bfloat16), "-o",
                tmp_path / "related", "--module", "model.layers.1.mlp.*")  # fmt: skip
    assert quiet.exit_code == 0 and "warning" not in quiet.stderr and "note" not in quiet.stderr


def test_eval_says_when_it_resumes_or_has_nothing_to_do_and_q_is_quiet(tmp_path: Path, monkeypatch) -> None:
    import surgery.progress
    from tests.helpers import save_tokenizer

    monkeypatch.setattr(surgery.progress, "LOG_INTERVAL_S", 0.0)  # a line at once, not after 30 s

    model = make_model(tmp_path / "m", 1)
    save_tokenizer(model)
    bench = tmp_path / "b.jsonl"
    bench.write_text("".join(json.dumps({"question": f"{i}+{i}?", "answer": str(2 * i)}) + "\n" for i in range(4)))
    args = ["eval", model, "-b", bench, "--max-new-tokens", 2, "--dtype", "float32", "-o", tmp_path / "r"]
    first = cli(*args)
    assert first.exit_code == 0, first.output
    # Not a terminal: progress comes as whole lines (no carriage returns), transformers' bars included.
    assert "eval b.jsonl:" in first.stderr and "\r" not in first.stderr
    records = tmp_path / "r" / "records.jsonl"
    lines = records.read_text().splitlines()
    records.write_text("\n".join(lines[:1]) + "\n")
    (tmp_path / "r" / "summary.json").unlink()
    resumed = cli(*args, "-q")
    assert resumed.exit_code == 0, resumed.output
    assert "resumed: 1 of 4 done" in resumed.stderr
    # -q: no bar of ours and none of transformers'.
    assert "Loading weights" not in resumed.stderr and "eval b.jsonl:" not in resumed.stderr
    again = cli(*args, "-q")
    assert again.exit_code == 0 and "already complete, nothing recomputed" in again.stderr
    # A folder written before the prompt style was recorded still resumes (the default was the only style).
    settings = tmp_path / "r" / "settings.json"
    settings.write_text(json.dumps({k: v for k, v in json.loads(settings.read_text()).items() if k != "prompt"}))
    old = cli(*args, "-q")
    assert old.exit_code == 0 and "already complete" in old.stderr, old.stderr


def test_eval_settings_record_the_prompt_format_used(tmp_path: Path) -> None:
    """A tokenizer without a chat template gets plain prompts, and settings.json says so, as summary.json does."""
    from tests.helpers import save_tokenizer

    model = make_model(tmp_path / "m", 1)
    save_tokenizer(model, chat=False)
    bench = tmp_path / "b.jsonl"
    bench.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    result = cli("eval", model, "-b", bench, "--max-new-tokens", 2, "-o", tmp_path / "r", "-q")
    assert result.exit_code == 0, result.output
    settings = json.loads((tmp_path / "r" / "settings.json").read_text())
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert settings["chat"] is False and summary["prompt_format"] == "plain"


def test_dtype_fast_is_bfloat16_only_where_it_runs_natively(tmp_path: Path, monkeypatch) -> None:
    import torch

    import surgery.checkpoints.loading as loading

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(loading, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else Path(p))
    cpuinfo.write_text("flags\t\t: fpu sse avx avx2 fma\n")
    assert not loading.native_bf16() and loading.resolve_dtype("fast") == torch.float32
    cpuinfo.write_text("flags\t\t: fpu sse avx avx2 avx512f avx512_bf16 amx_tile\n")
    assert loading.native_bf16() and loading.resolve_dtype("fast") == torch.bfloat16
    assert loading.resolve_dtype("auto") == "auto" and loading.resolve_dtype("float16") == torch.float16


def test_eval_prompt_lm_eval_is_lm_evals_gsm8k_format(tmp_path: Path) -> None:
    from surgery.evaluation.benchmarks import Problem, prompt_text
    from tests.helpers import save_tokenizer

    problem = Problem("p1", "Tom has 3 apples and buys 2. How many?", "5", "")
    assert prompt_text(problem, "gsm8k", 0, "lm-eval") == "Question: Tom has 3 apples and buys 2. How many?\nAnswer:"
    assert "Please reason step by step" in prompt_text(problem, "gsm8k", 0)
    model = make_model(tmp_path / "m", 1)
    save_tokenizer(model)  # it has a chat template: lm-eval's prompt is plain anyway
    bench = tmp_path / "b.jsonl"
    bench.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    args = ["eval", model, "-b", bench, "--max-new-tokens", 2, "-q"]
    assert cli(*args, "--prompt", "lm-eval", "-o", tmp_path / "lm").exit_code == 0
    settings = json.loads((tmp_path / "lm" / "settings.json").read_text())
    summary = json.loads((tmp_path / "lm" / "summary.json").read_text())
    (record,) = [json.loads(x) for x in (tmp_path / "lm" / "records.jsonl").read_text().splitlines()]
    assert settings["prompt"] == "lm-eval" and settings["chat"] is False and summary["prompt_format"] == "plain"
    assert record["prompt"] == "Question: 1+1?\nAnswer:"
    # Results of the two prompt styles are not compared with each other.
    assert cli(*args, "-o", tmp_path / "ours").exit_code == 0
    mixed = cli("report", "-s", tmp_path / "ours", "-t", tmp_path / "lm", "-p", tmp_path / "ours")
    assert mixed.exit_code == 2 and "chat=True but the target with False" in mixed.stderr


def test_device_decides_where_the_model_goes(tmp_path: Path, monkeypatch) -> None:
    """auto: the GPU when torch sees one; cpu: never the GPU; cuda: refused without one (before any loading)."""
    import torch
    import transformers

    import surgery.checkpoints.loading as loading

    seen: list[dict] = []

    class Fake:
        def eval(self) -> Fake:
            return self

    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", lambda path, **kw: seen.append(kw) or Fake()
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    loading.load_model(tmp_path, ModelOptions(device="auto"))
    loading.load_model(tmp_path, ModelOptions(device="cpu"))
    loading.load_model(tmp_path, ModelOptions(device="cpu"), max_memory="1GiB")
    loading.load_model(tmp_path, ModelOptions(device="auto"), max_memory="1GiB")
    assert seen[0]["device_map"] == "cuda" and "device_map" not in seen[1]
    assert seen[2]["max_memory"] == {"cpu": 2**30} and seen[3]["max_memory"] == {0: 2**30, 1: 2**30, "cpu": 2**30}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = make_model(tmp_path / "m", 1)
    refused = cli("eval", model, "-b", "gsm8k", "--device", "cuda", "-o", tmp_path / "r")
    assert refused.exit_code == 2 and "torch sees no CUDA GPU" in refused.stderr and not (tmp_path / "r").exists()


def test_every_stage_is_exported_from_surgery_and_import_surgery_stays_torch_free() -> None:
    """evaluate, choose_k (`surgery select`), sweep, report and push from `surgery`, as the README imports them."""
    code = (
        "import sys, surgery;"
        "print(sorted(m for m in ('torch', 'transformers', 'huggingface_hub') if m in sys.modules));"
        "print(' '.join(getattr(surgery, n).__module__ for n in ('evaluate', 'choose_k', 'sweep', 'report', 'push')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    free, modules = done.stdout.splitlines()
    assert free == "[]"
    assert modules.split() == [
        "surgery.evaluation.runner",
        "surgery.evaluation.select",
        "surgery.evaluation.sweep",
        "surgery.evaluation.report",
        "surgery.hub.publish",
    ]
    import surgery

    assert {"evaluate", "choose_k", "sweep", "report", "push"} <= set(surgery.__all__)
