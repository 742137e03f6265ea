"""Run a plan on this machine: each stage's study to its budget, then the final step.

Every step is the project's own CLI in a child process (``python -m stagetune
...``), so a plan does exactly what the equivalent ``optim init``/``run``,
``best``, ``train`` and ``evaluate`` commands would, and a killed plan leaves
what those commands leave: studies with exact budgets, trial checkpoints and a
resumable final training.  A rerun continues where it stopped.  Each stage's
``optim init`` arguments are recorded in its study (:data:`PLAN_ATTR`): an
unchanged, finished stage is skipped without starting a process, a changed one
is handed to ``optim init``, which lists the differences (and takes ``--force``
for the safe ones).
"""

from __future__ import annotations

import hashlib
from contextlib import nullcontext
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from stagetune.errors import StagetuneError
from stagetune.plan.spec import Plan, Stage
from stagetune.signals import handling

__all__ = [
    "PLAN_ATTR", "init_argv", "run_argv", "final_paths", "stage_state", "recorded", "final_done",
    "init_stage", "final_step", "Child", "run_plan",
]

#: Study user attribute holding the plan stage's ``optim init`` arguments.
PLAN_ATTR = "stagetune_plan_stage"


def init_argv(plan: Plan, stage: Stage, *, force: bool = False) -> list[str]:
    """The ``stagetune`` arguments that initialise ``stage``'s study."""
    edits = [x for s in stage.set for x in ("--set", s)]
    if stage.epochs is not None:
        edits += ["--set", f"training.num_epochs={stage.epochs}"]
    head = [x for f in stage.config for x in ("--read-ini", f)] + edits
    head += ["optim", "--study-name", plan.study_name(stage.name), plan.url, "init"]
    if stage.parent is None:
        head.append(plan.train)
        head += ["--dev-dir", plan.dev] if plan.dev else ["--dev-proportion", str(plan.dev_proportion or 0.1)]
    else:
        head += ["--from-study", plan.study_name(stage.parent)]
        if stage.top_k is not None:
            head += ["--top-k", str(stage.top_k)]
        if stage.threshold is not None:
            head += ["--threshold", str(stage.threshold)]
        if stage.independent:
            head.append("--independent")
        if stage.narrow is not None:
            head += ["--narrow", str(stage.narrow)]
        if stage.enqueue_best:
            head += ["--enqueue-best", str(stage.enqueue_best)]
    if stage.whitelist:
        head += ["--whitelist", *stage.whitelist]
    if stage.blacklist:
        head += ["--blacklist", *stage.blacklist]
    head += ["--num-trials", str(stage.trials), "--pruner", stage.pruner, "--metric", stage.metric,
             "--sampler", stage.sampler]
    if stage.mem_limit_bytes is not None:
        head += ["--mem-limit-bytes", str(stage.mem_limit_bytes)]
    if stage.time_limit is not None:
        head += ["--time-limit", str(stage.time_limit)]
    if stage.around_base is not None:
        head += ["--around-base", str(stage.around_base)]
    if stage.enqueue_base:
        head.append("--enqueue-base")
    return head + (["--force"] if force else [])


def run_argv(plan: Plan, stage: Stage, workers: int, gpus: str | None = None) -> list[str]:
    """The ``stagetune`` arguments of ``stage``'s workers (a local pool)."""
    argv = ["optim", "--study-name", plan.study_name(stage.name), plan.url, "run", "--workers", str(workers),
            "--sampler", stage.sampler, "--seed", str(stage.seed), "--ckpt-dir", plan.ckpt_dir, "--threads", "1"]
    if plan.heartbeat_interval is not None:
        argv += ["--heartbeat-interval", str(plan.heartbeat_interval)]
    if plan.grace_period is not None:
        argv += ["--grace-period", str(plan.grace_period)]
    return argv + (["--gpus", gpus] if gpus else [])


def final_paths(plan: Plan) -> dict[str, Path]:
    """Where the final step writes: best config, model dir, test result."""
    out = Path(plan.out_dir)
    return {"best": out / "best.ini", "model_dir": out / "final", "result": out / "final" / "result.json"}


def _fingerprint(argv: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(argv)).encode()).hexdigest()[:16]


def stage_state(plan: Plan, stage: Stage) -> dict[str, Any] | None:
    """The stage's study as ``optim status`` sees it, plus its recorded plan arguments; None if not created."""
    from stagetune.optim.status import study_status
    from stagetune.optim.storage import storage_session
    from stagetune.optim.study import load_study

    name = plan.study_name(stage.name)
    url_path = plan.url.removeprefix("sqlite:///")
    if plan.url.startswith("sqlite:///") and not Path(url_path).exists():
        return None
    with storage_session(plan.url, heartbeat_interval=None, create=False) as storage:
        try:
            study_id = storage.get_study_id_from_name(name)
        except KeyError:
            return None
        study, spec = load_study(storage, name, plan.url)
        status = study_status(study, spec, storage)
        status["plan_argv"] = storage.get_study_user_attrs(study_id).get(PLAN_ATTR)
    return status


def _record(plan: Plan, stage: Stage, fingerprint: str) -> None:
    from stagetune.optim.storage import storage_session

    with storage_session(plan.url, heartbeat_interval=None, create=False) as storage:
        study_id = storage.get_study_id_from_name(plan.study_name(stage.name))
        storage.set_study_user_attr(study_id, PLAN_ATTR, fingerprint)


class Child:
    """``python -m stagetune ARGV``, one at a time; :meth:`forward` passes our signals on."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None

    def __call__(self, argv: Sequence[str], say: Callable[[str], None], *, stdout: Path | None = None) -> int:
        """Run it (its standard output into ``stdout`` when given) and return its exit status."""
        say("+ stagetune " + " ".join(argv))
        with open(stdout, "wb") if stdout is not None else nullcontext() as sink:
            self.proc = subprocess.Popen([sys.executable, "-m", "stagetune", *argv], stdout=sink)
            try:
                return self.proc.wait()
            finally:
                self.proc = None

    def forward(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)


def run_plan(
    plan: Plan,
    *,
    workers: int | None = None,
    gpus: str | None = None,
    force: bool = False,
    say: Callable[[str], None] = print,
) -> int:
    """Run every stage to its budget, then the final step; the exit status."""
    child = Child()
    interrupted: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        interrupted.append(signum)
        child.forward(signum)

    Path(plan.out_dir).mkdir(parents=True, exist_ok=True)  # the plan's own: database, checkpoints, final model
    with handling(on_signal):
        for stage in plan.stages:
            code = _run_stage(plan, stage, workers or plan.stage_workers(stage), gpus, force, child, say)
            if interrupted:
                return 128 + interrupted[0]
            if code != 0:
                return code
        if plan.final is not None:
            code = final_step(plan, child, say)
            if interrupted:
                return 128 + interrupted[0]
            if code != 0:
                return code
        say(f"plan {plan.name}: done")
        return 0


def recorded(plan: Plan, stage: Stage, state: dict[str, Any] | None) -> bool:
    """Whether ``state`` (of :func:`stage_state`) was initialised with the plan's current arguments."""
    return state is not None and state.get("plan_argv") == _fingerprint(init_argv(plan, stage))


def init_stage(plan: Plan, stage: Stage, child: Child, say: Callable[[str], None], *, force: bool = False) -> int:
    """``optim init`` of ``stage`` unless already done with these arguments; records them."""
    if recorded(plan, stage, stage_state(plan, stage)):
        return 0
    Path(plan.out_dir).mkdir(parents=True, exist_ok=True)
    code = child(init_argv(plan, stage, force=force), say)
    if code == 0:
        _record(plan, stage, _fingerprint(init_argv(plan, stage)))
    return code


def _run_stage(
    plan: Plan, stage: Stage, workers: int, gpus: str | None, force: bool, child: Child, say: Callable[[str], None]
) -> int:
    code = init_stage(plan, stage, child, say, force=force)
    if code != 0:
        return code
    state = stage_state(plan, stage)
    if state is not None and state["budget_met"]:
        say(f"stage {stage.name}: budget met ({state['finished']}/{state['num_trials']} trials)")
        return 0
    code = child(run_argv(plan, stage, workers, gpus), say)
    if code != 0:
        return code
    state = stage_state(plan, stage)
    if state is None or not state["budget_met"]:
        raise StagetuneError(
            f"stage {stage.name}: its workers stopped before the budget was met "
            f"({state['finished'] if state else 0}/{stage.trials}); rerun the plan to continue"
        )
    say(f"stage {stage.name}: budget met ({state['finished']}/{state['num_trials']} trials)")
    return 0


def final_done(plan: Plan) -> dict[str, Any] | None:
    """The final step's result when it was trained from the final stage's current best trial."""
    if plan.final is None:
        return None
    state = stage_state(plan, plan.stage(plan.final))
    best = state["best"] if state else None
    result = final_paths(plan)["result"]
    if best is None or not result.exists():
        return None
    try:
        done = json.loads(result.read_text())
    except (OSError, ValueError):
        return None
    same = done.get("trial") == best["number"] and done.get("study") == plan.study_name(plan.final)
    return done if same else None


def final_step(plan: Plan, child: Child, say: Callable[[str], None]) -> int:
    """Train the final stage's best config (``final_epochs``) and evaluate it on the test dir."""
    paths = final_paths(plan)
    stage = plan.stage(plan.final)
    done = final_done(plan)
    if done is not None:
        say(f"final: trained already: {_describe(done)}")
        return 0
    state = stage_state(plan, stage)
    best = state["best"] if state else None
    if best is None:
        raise StagetuneError(f"final step: stage {stage.name} has no complete trial to train")
    steps = [
        ["optim", "--study-name", plan.study_name(stage.name), plan.url, "best", str(paths["best"])],
        ["--read-ini", str(paths["best"]),
         *(["--set", f"training.num_epochs={plan.final_epochs}"] if plan.final_epochs else []),
         "train", plan.train, *([plan.dev] if plan.dev else []), str(paths["model_dir"]), "--threads", "1", "--quiet"],
    ]
    for argv in steps:
        code = child(argv, say)
        if code != 0:
            return code
    result: dict[str, Any] = {"study": plan.study_name(stage.name), "trial": best["number"],
                              "dev_value": best["value"], "model": str(paths["model_dir"] / "model.pt")}
    if plan.test:
        out = paths["model_dir"] / "test.json"
        code = child(["evaluate", result["model"], plan.test, "--json"], say, stdout=out)
        if code != 0:
            return code
        result["test"] = json.loads(out.read_text())
    tmp = paths["result"].with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, paths["result"])
    say(f"final: {_describe(result)}")
    return 0


def _describe(result: dict[str, Any]) -> str:
    text = f"model {result['model']} (best trial {result['trial']} of {result['study']})"
    test = result.get("test")
    if test:
        text += f", test error {test['rate']:.2%}"
    return text
