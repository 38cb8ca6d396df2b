"""`surgery solutions` and `--solutions source`: a model's own correct answers, with the exact prompts `eval`
renders, as a workload that taylor and select score as it is (issue 27 item 1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import surgery.evaluation.runner
from surgery import load_manifest, load_workload
from surgery.analysis.nll import encode_gold, gold_nll
from surgery.checkpoints.options import ModelOptions
from surgery.evaluation.runner import evaluate, read_records
from surgery.evaluation.solutions import solutions
from tests.helpers import cli, make_model, noisy_target, refused, save_tokenizer

CHANGED = ("model.layers.1.mlp.down_proj", "model.layers.3.mlp.up_proj")
QUESTIONS = [f"What is {a} plus {b}?" for a, b in ((2, 3), (7, 5), (10, 4), (6, 6), (9, 1), (3, 8), (4, 4), (5, 2))]
HELD_OUT = [f"Add {a} and {b}." for a, b in ((1, 1), (8, 3), (2, 9), (7, 7), (5, 6), (4, 2), (9, 9), (3, 3))]
TOKENS, BATCH = 4, 4  # every run here decodes 4 tokens in batches of 4, so the same prompt gets the same answer
QUIET = ModelOptions(progress=False)
RUN = ("--max-new-tokens", TOKENS, "--batch-size", BATCH, "-q")


def _answers(
    model: Path, questions: list[str], folder: Path, options: ModelOptions = QUIET, **asking: object
) -> list[str]:
    """What `model` answers to each question, as eval asks it (`asking`: eval's shots and prompt)."""
    folder.mkdir(exist_ok=True)
    probe = folder / "probe.jsonl"
    probe.write_text("".join(json.dumps({"question": q, "answer": "0"}) + "\n" for q in questions))
    evaluate(model, str(probe), folder / "probe", max_new_tokens=TOKENS, batch_size=BATCH, options=options,
             **asking)  # type: ignore[arg-type]  # fmt: skip
    return [r["output"] for r in read_records(folder / "probe" / "records.jsonl")]


def _problems(folder: Path, name: str, questions: list[str], answers: list[str]) -> dict[str, Path]:
    """The same problems as a benchmark (question/answer) and as a gold workload (prompt/solution): the even ones
    answered as the model answers them (correct), the odd ones with an answer it never gives (wrong)."""
    gold = [a if i % 2 == 0 else "-1" for i, a in enumerate(answers)]
    bench, work = folder / f"{name}.jsonl", folder / f"{name}-work.jsonl"
    pairs = list(zip(questions, gold, strict=True))
    bench.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in pairs))
    work.write_text("".join(json.dumps({"prompt": q, "solution": f"It is.\n#### {a}"}) + "\n" for q, a in pairs))
    return {"bench": bench, "work": work}


@pytest.fixture(scope="module")
def digit_pair(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny source that only ever writes digits (so its answers are numbers the GSM8K grader reads), a target
    that is the source with CHANGED overwritten by noise, and problems whose gold answers are half the source's
    own answers: a model that answers some problems correctly and some not, built in seconds."""
    root = tmp_path_factory.mktemp("solutions")
    source = make_model(root / "source", 21, num_hidden_layers=4)
    save_tokenizer(source)
    lm = AutoModelForCausalLM.from_pretrained(source)
    digits = [4 + ord(d) - 32 for d in "0123456789"]  # save_tokenizer: 4 special tokens, then chr(32)...
    with torch.no_grad():
        head = lm.lm_head.weight
        kept = head[digits] * 10
        head.zero_()
        head[digits] = kept
        lm.save_pretrained(source)
    target = noisy_target(lm, CHANGED, root / "target")
    manifest = root / "m.json"
    assert cli("manifest", "-s", source, "-t", target, "--method", "weight-delta", "-o", manifest).exit_code == 0
    answers = _answers(source, QUESTIONS, root / "train")
    held_out = _answers(source, HELD_OUT, root / "val")
    assert all(a.isdigit() for a in answers + held_out), answers + held_out
    return {
        "source": source,
        "target": target,
        "manifest": manifest,
        "train": _problems(root, "train", QUESTIONS, answers),
        "val": _problems(root, "val", HELD_OUT, held_out),
        "root": root,
    }


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_solutions_keeps_the_correct_answers_with_evals_exact_prompts(digit_pair: dict, tmp_path: Path) -> None:
    bench = digit_pair["train"]["bench"]
    out = tmp_path / "w.jsonl"
    r = cli("solutions", digit_pair["source"], "-w", bench, *RUN, "-o", out)
    assert r.exit_code == 0, r.output
    assert r.stdout == (
        f"wrote {out}: 4 of 8 answers graded correct (50.0%), chat prompts as eval renders them; "
        f"answers in {out}.eval\n"
    )
    evaluate(digit_pair["source"], str(bench), tmp_path / "eval", max_new_tokens=TOKENS, batch_size=BATCH,
             options=QUIET)  # fmt: skip
    records = read_records(tmp_path / "eval" / "records.jsonl")
    # The answers were generated and graded as eval does: the same records, in an eval results folder.
    assert read_records(Path(f"{out}.eval") / "records.jsonl") == records
    lines = _lines(out)
    assert (
        [line["id"] for line in lines]
        == [r["id"] for r in records if r["correct"]]
        == [f"train.jsonl:{i}" for i in (1, 3, 5, 7)]
    )
    by_id = {r["id"]: r for r in records}
    for line in lines:
        record = by_id[line["id"]]
        assert line == {
            "id": record["id"],
            "prompt": record["prompt"],  # the exact text eval rendered and generated from
            "solution": record["output"],
            "prompt_format": "chat",
            "gold": record["gold"],
        }
        assert line["prompt"].endswith("assistant:") and QUESTIONS[int(line["id"].split(":")[1]) - 1] in line["prompt"]
    w = load_workload(str(out))
    assert w.prompt_format == "chat" and w.prompts == tuple(line["prompt"] for line in lines)
    assert w.solutions == tuple(line["solution"] for line in lines)


def test_the_solution_is_the_models_own_greedy_continuation(digit_pair: dict, tmp_path: Path) -> None:
    """Teacher-forced after its prompt (as taylor and select encode it), every token of a kept answer is the one
    the model would pick: the NLL of the solution is the NLL of the model's own continuation."""
    source = digit_pair["source"]
    result = solutions(source, str(digit_pair["train"]["bench"]), tmp_path / "w.jsonl", max_new_tokens=TOKENS,
                       batch_size=BATCH, options=QUIET)  # fmt: skip
    assert result.summary.correct == 4 and result.prompt_format == "chat"
    tokenizer = AutoTokenizer.from_pretrained(source)
    gold = encode_gold(tokenizer, load_workload(str(result.out)), chat=True)
    lm = AutoModelForCausalLM.from_pretrained(source)
    for prompt, solution in zip(gold.prompts, gold.solutions, strict=True):
        assert len(solution) == TOKENS
        with torch.no_grad():
            logits = lm(torch.tensor([prompt + solution])).logits[0]
        assert logits[len(prompt) - 1 : -1].argmax(-1).tolist() == solution


def test_a_gold_workload_is_asked_as_eval_asks_its_problems(digit_pair: dict, tmp_path: Path) -> None:
    """A workload with gold solutions ('#### N') gives the prompts and answers of the same problems as a benchmark;
    without the chat template, the prompts are eval's plain ones."""
    train = digit_pair["train"]
    kw = {"max_new_tokens": TOKENS, "batch_size": BATCH, "options": QUIET}
    from_bench = solutions(digit_pair["source"], str(train["bench"]), tmp_path / "b.jsonl", **kw)
    from_work = solutions(digit_pair["source"], str(train["work"]), tmp_path / "w.jsonl", **kw)
    a, b = load_workload(str(from_bench.out)), load_workload(str(from_work.out))
    assert (a.prompts, a.solutions) == (b.prompts, b.solutions) and len(a.prompts) == 4
    assert [line["id"] for line in _lines(from_work.out)] == [f"train-work.jsonl:{i}" for i in (0, 2, 4, 6)]
    # Plain prompts: the problems made again so that the plain answers are the correct ones.
    plain = ModelOptions(chat=False, progress=False)
    answers = _answers(digit_pair["source"], QUESTIONS, tmp_path, plain)
    bench = _problems(tmp_path, "plain", QUESTIONS, answers)["bench"]
    result = solutions(digit_pair["source"], str(bench), tmp_path / "p.jsonl", **{**kw, "options": plain})
    records = {r["id"]: r for r in read_records(tmp_path / "probe" / "records.jsonl")}
    lines = _lines(result.out)
    assert result.prompt_format == "plain" and len(lines) == 4
    for line in lines:
        probe = records["probe.jsonl:" + line["id"].split(":")[1]]
        assert line["prompt"] == probe["prompt"] and line["prompt"].startswith("Question: ")
        assert line["prompt_format"] == "plain" and line["solution"] == probe["output"]


def test_solutions_asks_with_evals_shots_prompt_style_and_memory_budget(digit_pair: dict, tmp_path: Path) -> None:
    """--shots, --prompt lm-eval and --max-memory reach eval's runner: each kept prompt is the one an eval with the
    same options renders (lm-eval's plain text, the exemplar first), each kept answer that eval's answer."""
    answers = _answers(digit_pair["source"], QUESTIONS, tmp_path, prompt="lm-eval", shots=1)
    bench = _problems(tmp_path, "lm", QUESTIONS, answers)["bench"]
    out = tmp_path / "w.jsonl"
    r = cli("solutions", digit_pair["source"], "-w", bench, "--prompt", "lm-eval", "--shots", 1, "--max-memory",
            "1GiB", *RUN, "-o", out)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "4 of 8 answers graded correct (50.0%), plain prompts" in r.stdout
    probe = {r["id"].split(":")[1]: r for r in read_records(tmp_path / "probe" / "records.jsonl")}
    lines = _lines(out)
    assert [line["id"] for line in lines] == [f"lm.jsonl:{i}" for i in (1, 3, 5, 7)]
    for line in lines:
        asked = probe[line["id"].split(":")[1]]
        assert line["prompt"] == asked["prompt"] and line["solution"] == asked["output"]
        assert line["prompt_format"] == "plain" and line["prompt"].count("Question: ") == 2
    settings = json.loads((Path(f"{out}.eval") / "settings.json").read_text())
    assert (settings["prompt"], settings["shots"], settings["chat"]) == ("lm-eval", 1, False)
    refused(["solutions", digit_pair["source"], "-w", bench, "--shots", 9, "-o", tmp_path / "x.jsonl"], "shots",
            watch=tmp_path)  # fmt: skip


def test_taylor_and_select_score_the_prompts_as_they_are(digit_pair: dict, tmp_path: Path) -> None:
    kw = {"max_new_tokens": TOKENS, "batch_size": BATCH, "options": QUIET}
    ranking = solutions(digit_pair["source"], str(digit_pair["train"]["work"]), tmp_path / "w.jsonl", **kw).out
    m = tmp_path / "taylor.json"
    r = cli("manifest", "--method", "taylor", "-s", digit_pair["source"], "-t", digit_pair["target"], "-w", ranking,
            "-o", m)  # fmt: skip
    assert r.exit_code == 0, r.output
    w = load_workload(str(ranking))
    recorded = load_manifest(m).workload
    assert recorded is not None and (recorded.name, recorded.sha256, recorded.prompts) == ("w.jsonl", w.sha256, 4)
    validation = solutions(digit_pair["source"], str(digit_pair["val"]["bench"]), tmp_path / "v.jsonl", **kw).out
    out = tmp_path / "sel.json"
    r = cli("select", digit_pair["manifest"], "-s", digit_pair["source"], "-t", digit_pair["target"],
            "--validation", validation, "--ks", "1,2,4", "--min-recovery", 99, "-q", "-o", out)  # fmt: skip
    assert r.exit_code == 0, r.output
    sel = load_manifest(out).selection
    assert sel is not None and sel.k == 2 and sel.validation["name"] == "v.jsonl" and sel.validation["count"] == 4
    # The source's baseline is the NLL of those very rows, their prompts not rendered again.
    v = load_workload(str(validation))
    gold = encode_gold(AutoTokenizer.from_pretrained(digit_pair["source"]), v, chat=True)
    nll = gold_nll(AutoModelForCausalLM.from_pretrained(digit_pair["source"]), gold.prompts, gold.solutions, 0)
    assert sel.baselines["source"] == pytest.approx(sum(nll) / len(nll), rel=1e-6)
    refused(
        ["select", digit_pair["manifest"], "-s", digit_pair["source"], "-t", digit_pair["target"], "--validation",
         validation, "--metric", "accuracy", "-o", tmp_path / "acc.json"],
        "--metric accuracy answers problems, and workload v.jsonl holds prompts already rendered (chat); "
        "pass the problems themselves",
        watch=tmp_path,
    )  # fmt: skip


def test_solutions_source_on_select_and_analyze(digit_pair: dict, tmp_path: Path) -> None:
    """The source's correct answers to the validation (select) or ranking (analyze) problems, generated once into
    the cache, are what is scored; the manifest records them."""
    pair = ("-s", digit_pair["source"], "-t", digit_pair["target"])
    val, train = digit_pair["val"]["bench"], digit_pair["train"]["work"]
    select = ("select", digit_pair["manifest"], *pair, "--validation", val, "--solutions", "source", "--ks", "1,2,4")
    r = cli(*select, *RUN, "--min-recovery", 99, "-o", tmp_path / "sel.json")
    assert r.exit_code == 0, r.output
    assert "solutions: 4 of 8 answers graded correct (50.0%); kept in " in r.stderr
    sel = load_manifest(tmp_path / "sel.json").selection
    assert sel is not None and sel.k == 2 and sel.validation["count"] == 4
    assert sel.validation["name"] == "val.jsonl.source.solutions.jsonl"
    r = cli(*select, *RUN, "-o", tmp_path / "again.json")
    assert r.exit_code == 0 and "solutions: reusing " in r.stderr and "answers graded correct" in r.stderr
    assert load_manifest(tmp_path / "again.json").selection.validation == sel.validation  # type: ignore[union-attr]

    analyze = ("analyze", *pair, "-w", train, "--method", "taylor", "--solutions", "source")
    r = cli(*analyze, *RUN, "-o", tmp_path / "m.json")
    assert r.exit_code == 0, r.output
    recorded = load_manifest(tmp_path / "m.json").workload
    assert recorded is not None and recorded.name == "train-work.jsonl.source.solutions.jsonl" and recorded.prompts == 4
    # --auto-k: the ranking on the cached answers (reused), K chosen on the source's answers to held-out problems;
    # select finds the ranking workload in the cache to check that the two are disjoint.
    r = cli(*analyze, "--auto-k", "--validation", val, "-k", "1,2", *RUN, "-o", tmp_path / "auto.json")
    assert r.exit_code == 0, r.output
    auto = load_manifest(tmp_path / "auto.json")
    assert auto.workload == recorded and auto.selection is not None
    assert auto.selection.validation["name"] == "val.jsonl.source.solutions.jsonl"
    assert "reusing" in r.stderr and "cannot be reloaded" not in r.stderr
    # Choosing K on the gold solutions of the problems the ranking answered is refused: they are the same problems.
    r = cli("select", tmp_path / "m.json", *pair, "--validation", train, "-q", "-o", tmp_path / "x.json")
    assert r.exit_code == 2 and "shares 4 prompts with the ranking workload train-work.jsonl.source" in r.stderr


def test_an_interrupted_run_resumes_from_its_records(
    digit_pair: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real, asked = surgery.evaluation.runner.greedy_generate, []

    def first_batch_only(model, tokenizer, prompts, max_new_tokens, batch_size, stops, on_batch):
        def save_then_stop(*batch):
            on_batch(*batch)
            raise KeyboardInterrupt  # Ctrl-C after the first batch is saved

        real(model, tokenizer, prompts, max_new_tokens, batch_size, stops, save_then_stop)

    def counted(model, tokenizer, prompts, *args):
        asked.append(len(prompts))
        real(model, tokenizer, prompts, *args)

    out, kw = tmp_path / "w.jsonl", {"max_new_tokens": TOKENS, "batch_size": BATCH, "options": QUIET}
    monkeypatch.setattr(surgery.evaluation.runner, "greedy_generate", first_batch_only)
    with pytest.raises(KeyboardInterrupt):
        solutions(digit_pair["source"], str(digit_pair["train"]["bench"]), out, **kw)
    assert not out.exists() and len(read_records(tmp_path / "w.jsonl.eval" / "records.jsonl")) == BATCH
    monkeypatch.setattr(surgery.evaluation.runner, "greedy_generate", counted)
    result = solutions(digit_pair["source"], str(digit_pair["train"]["bench"]), out, **kw)
    assert asked == [8 - BATCH]  # only the problems without a record
    fresh = solutions(digit_pair["source"], str(digit_pair["train"]["bench"]), tmp_path / "fresh.jsonl", **kw)
    assert result.summary.correct == 4 and out.read_text() == fresh.out.read_text()


def test_refusals_write_nothing(digit_pair: dict, tmp_path: Path) -> None:
    source, questions = digit_pair["source"], QUESTIONS[:4]
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / "w.jsonl"
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text("".join(json.dumps({"question": q, "answer": "-1"}) + "\n" for q in questions))
    refused(["solutions", source, "-w", wrong, *RUN, "-o", out],
            f"none of the 4 answers of source to wrong.jsonl was graded correct, so there is no solution to keep and "
            f"{out} was not written", watch=folder)  # fmt: skip
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in questions))
    no_answer = tmp_path / "no-answer.jsonl"
    no_answer.write_text("".join(json.dumps({"prompt": q, "solution": "Easy."}) + "\n" for q in questions))
    rendered = tmp_path / "rendered.jsonl"
    rendered.write_text(json.dumps({"prompt": "user: q\nassistant:", "solution": "1", "prompt_format": "chat"}) + "\n")
    for workload, message in (
        (prompts, "surgery solutions needs gold solutions, and workload prompts.jsonl has none"),
        (no_answer, "surgery solutions grades final answers, and problem 1 of workload no-answer.jsonl has none"),
        (rendered, "workload rendered.jsonl holds prompts already rendered (chat); pass the problems themselves"),
        ("general-text:4", "workload general-text:4:0 holds plain text"),
        ("nope", "'nope' is no file, benchmark (gsm8k, math500, addition) or built-in workload"),
    ):
        refused(["solutions", source, "-w", workload, "-o", out], message, watch=folder)
    out.write_text("mine\n")
    refused(["solutions", source, "-w", digit_pair["train"]["bench"], "-o", out],
            f"output {out} already exists; choose a new path or pass --overwrite", watch=folder)  # fmt: skip
    pair = ("-s", source, "-t", digit_pair["target"])
    refused(["analyze", *pair, "-w", digit_pair["train"]["work"], "--method", "lae", "--solutions", "source",
             "-o", folder / "m.json"],
            "--solutions source changes the solutions that taylor and swap-nll score, and --method lae scores none",
            watch=folder)  # fmt: skip
    val = digit_pair["val"]["bench"]
    select = ["select", digit_pair["manifest"], *pair, "--validation", val, "-o", folder / "s.json"]
    refused([*select, "--solutions", "source", "--metric", "accuracy"],
            "--solutions source changes the solutions --metric nll scores", watch=folder)  # fmt: skip
    refused([*select, "--solutions", "target"], "--solutions 'target' is not one of source", watch=folder)
    # The built-in benchmarks are the test problems eval scores: never ranked or chosen on.
    test_split = "--solutions source answers the problems of a workload, and gsm8k is an evaluation benchmark"
    refused(["select", digit_pair["manifest"], *pair, "--validation", "gsm8k", "--solutions", "source", "-o",
             folder / "s.json"], test_split, watch=folder)  # fmt: skip
    refused(["analyze", *pair, "-w", "gsm8k", "--solutions", "source", "-o", folder / "m.json"], test_split,
            watch=folder)  # fmt: skip
