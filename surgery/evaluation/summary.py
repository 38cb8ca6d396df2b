"""What an evaluation is run with (`settings.json`) and what it found (`summary.json`), typed."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class EvalSettings:
    """Everything that determines an evaluation's results (compared on resume).

    `chat` is whether the chat template was used: asked for and present in the tokenizer (a model
    without one gets plain prompts, and `chat` says false, as `prompt_format` says `plain`).

    `dtype` is the dtype the weights were computed in (`runner.eval_settings`, for `eval` and `sweep`
    alike), not the `--dtype` asked for: `auto` (the checkpoint's) and `fast` (the hardware's) name no
    dtype, so a rerun in another dtype must not resume those results. `sweep` folders written before
    surgery recorded it this way hold the `--dtype` asked for: `report` reads them as before (it compares
    no dtype), and a sweep rerun into one refuses it in one line rather than mixing dtypes.
    """

    benchmark: str
    benchmark_sha256: str
    problem_ids_sha256: str
    limit: int | None
    seed: int
    shots: int
    chat: bool
    max_new_tokens: int
    dtype: str
    model_fingerprint: str
    prompt: str = "surgery"  # the prompt style (benchmarks.PROMPT_STYLES); settings written before it had it

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict) -> EvalSettings:
        return cls(**d)


@dataclass(frozen=True)
class EvalSummary:
    """The result of one evaluation, as written to `summary.json`.

    Attributes:
        model: the model's label (its path).
        benchmark, grader: what was scored, and how.
        problems, correct, accuracy, accuracy_ci95: the score with its 95% Wilson interval.
        nll_mean: mean gold-solution NLL in nats/token (None if no problem had one).
        mean_tokens: mean generated tokens per problem.
        prompt_format: `chat` or `plain`, as rendered.
        settings: everything that determines the results.
        versions: library versions.
        strict_accuracy, strict_accuracy_ci95: GSM8K's strict-format match only (None for other graders).
    """

    model: str
    benchmark: str
    grader: str
    problems: int
    correct: int
    accuracy: float
    accuracy_ci95: tuple[float, float]
    nll_mean: float | None
    mean_tokens: float
    prompt_format: str | None
    settings: EvalSettings
    versions: dict[str, str]
    strict_accuracy: float | None = None
    strict_accuracy_ci95: tuple[float, float] | None = None

    def to_dict(self) -> dict:
        """The `summary.json` object (the strict fields only where the grader has them)."""
        d = asdict(self)
        d["accuracy_ci95"] = list(self.accuracy_ci95)
        if self.strict_accuracy is None:
            del d["strict_accuracy"], d["strict_accuracy_ci95"]
        else:
            d["strict_accuracy_ci95"] = list(self.strict_accuracy_ci95 or ())
        return d

    @classmethod
    def from_dict(cls, d: dict) -> EvalSummary:
        strict_ci = d.get("strict_accuracy_ci95")
        return cls(
            **{k: d[k] for k in ("model", "benchmark", "grader", "problems", "correct", "accuracy")},
            accuracy_ci95=tuple(d["accuracy_ci95"]),
            nll_mean=d["nll_mean"],
            mean_tokens=d["mean_tokens"],
            prompt_format=d["prompt_format"],
            settings=EvalSettings.from_dict(d["settings"]),
            versions=d["versions"],
            strict_accuracy=d.get("strict_accuracy"),
            strict_accuracy_ci95=tuple(strict_ci) if strict_ci is not None else None,
        )
