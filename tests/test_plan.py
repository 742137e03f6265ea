"""``stagetune plan``: staged searches declared in a file, run with the real CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optim_helpers import (
    LR_DOMINATED, assert_one_line_error, cli, create_study, lr_dominated, opened_study, read_spec, start_cli,
    stop_group, trial_states, wait_for, write_speech_data,
)

from stagetune.cli import main
from stagetune.optim.sampling import sample_values
from stagetune.optim.spec import store_spec_json
from stagetune.plan.runner import init_argv
from stagetune.plan.spec import read_plan

MODEL = "model.convolutional_layers=0 model.recurrent_layers=1 model.recurrent_size=8 data.batch_size=4"


def plan_text(tmp: Path, *, sm_trials: int = 3, lg: str = "", **plan: str) -> str:
    head = {
        "train": str(tmp / "train"), "test": str(tmp / "test"), "dev_proportion": "0.25",
        "out_dir": str(tmp / "out"), "final": "lg", "final_epochs": "1", "heartbeat_interval": "1",
        "grace_period": "3", **plan,
    }
    return (
        "[plan]\n" + "".join(f"{k} = {v}\n" for k, v in head.items() if v)
        + f"[sm]\nset = {MODEL}\nwhitelist = training\\.learning_rate training\\.dropout_prob\n"
        f"epochs = 1\ntrials = {sm_trials}\nsampler = random\nmetric = loss\nseed = 1\n"
        f"[lg]\nfrom = sm\ntop_k = 1\ntrials = 2\n{lg}"
    )


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    write_speech_data(tmp_path / "train", 16)
    write_speech_data(tmp_path / "test", 6)
    return tmp_path


def write(tmp: Path, text: str, name: str = "p.ini") -> Path:
    path = tmp / name
    path.write_text(text)
    return path


def test_a_derived_stage_inherits_its_parents_settings_unless_it_sets_them(corpus: Path) -> None:
    plan = read_plan(write(corpus, plan_text(corpus, lg="pruner = median\n")))
    sm, lg = plan.stages
    assert (lg.parent, lg.trials, lg.pruner) == ("sm", 2, "median")
    assert (lg.sampler, lg.metric, lg.epochs, lg.seed) == (sm.sampler, sm.metric, sm.epochs, sm.seed) == ("random", "loss", 1, 1)
    assert plan.study_name("lg") == "p-lg" and plan.url == f"sqlite:///{corpus / 'out'}/optim.db"


def test_around_base_is_any_stages_own_and_reaches_its_init(corpus: Path) -> None:
    plan = read_plan(write(corpus, plan_text(corpus, lg="around_base = 0.25\n")))
    sm, lg = plan.stages
    assert (sm.around_base, lg.around_base) == (None, 0.25)  # not inherited: lg narrows around sm's best
    argv = init_argv(plan, lg)
    assert argv[argv.index("--around-base") + 1] == "0.25" and "--around-base" not in init_argv(plan, sm)


BAD = [
    ("unknown key", "seed = 1\n", "seed = 1\nepoks = 2\n", "[sm]: unknown key 'epoks'"),
    ("from no stage", "from = sm", "from = nope", "[lg] from = 'nope': no such stage; stages: sm, lg"),
    ("cycle", "trials = 2\n", "trials = 2\n[x]\nfrom = y\ntop_k = 1\n[y]\nfrom = x\ntop_k = 1\n", "a cycle (x -> y -> x)"),
    ("nothing to tune", "whitelist = training\\.learning_rate", "whitelist = training\\.nothing_like_this",
     "[sm] whitelist/blacklist: --whitelist 'training\\\\.nothing_like_this' matches no tunable parameter"),
    ("derived needs top_k", "top_k = 1\n", "", "[lg]: a stage derived from 'sm' needs top_k or threshold"),
    ("whitelist and top_k", "[lg]\n", "[lg]\nwhitelist = x\n", "[lg] whitelist: a derived stage tunes either"),
    ("bad number", "trials = 2\n", "trials = two\n", "[lg] trials = 'two': not an integer"),
    ("final no stage", "final = lg", "final = md", "[plan] final = 'md': no such stage"),
    ("no plan section", "[plan]\n", "[plam]\n", "no [plan] section"),
    ("bad set", f"set = {MODEL}", "set = model.recurrent_size=-3", "[sm] config/set:"),
    ("slurm time too short", "trials = 2\n", "trials = 2\ntime = 2\n",
     "[lg] time = '2': workers are warned 120 s before their time limit"),
    ("slurm bad time", "final = lg", "final = lg\ntime = 2h", "[plan] time = '2h': expected a Slurm time limit"),
    ("slurm bad gres", "seed = 1\n", "seed = 1\ngres = gpu 1\n", "[sm] gres = 'gpu 1': expected generic resources"),
    ("slurm own option", "final = lg", "final = lg\nsbatch = --qos=x -J name",
     "[plan] sbatch = '--qos=x -J name': -J: the plan sets --job-name of its jobs itself"),
    ("slurm no option", "seed = 1\n", "seed = 1\nsbatch = qos=x\n",
     "[sm] sbatch = 'qos=x': 'qos=x' is no sbatch option"),
    ("slurm workers", "trials = 2\n", "trials = 2\nworkers = 0\n", "[lg] workers = '0': must be >= 1"),
    ("around_base above 1", "trials = 2\n", "trials = 2\naround_base = 2\n", "[lg] around_base = '2': must be in [1e-06, 1.0]"),
]


@pytest.mark.parametrize(("old", "new", "needle"), [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_an_invalid_plan_is_one_line_naming_file_section_and_key(
    corpus: Path, capsys: pytest.CaptureFixture[str], old: str, new: str, needle: str
) -> None:
    text = plan_text(corpus)
    assert old in text
    path = write(corpus, text.replace(old, new, 1))
    assert main(["plan", str(path), "status"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"stagetune: error: {path}"), err
    assert needle in err[0], err[0]
    assert not (corpus / "out").exists()  # nothing written


def _states(url: str, name: str) -> Counter[str]:
    return trial_states(url, name)


def _counts(corpus: Path, url: str, name: str) -> Counter[str]:
    """Trial states of a study a running plan may not have created yet (then none)."""
    if not (corpus / "out" / "optim.db").exists():
        return Counter()
    try:
        return trial_states(url, name)
    except Exception:  # the database or the study is still being created
        return Counter()


def _running(proc: subprocess.Popen[bytes], log: Path, url: str, name: str) -> bool:
    """Whether study ``name`` has a running trial; fails with the plan's log if the plan ended first."""
    assert proc.poll() is None, log.read_text()
    return _counts(log.parent, url, name)["RUNNING"] >= 1


def _trials(url: str, name: str) -> list[tuple[int, str, dict]]:
    with opened_study(url, name) as study:
        return [(t.number, t.state.name, t.system_attrs) for t in study.get_trials(deepcopy=False)]


def test_plan_runs_every_stage_to_its_exact_budget_then_the_final_model_and_resumes(corpus: Path) -> None:
    # lg's trials last long enough to interrupt: an epoch of this corpus takes milliseconds, and on a
    # loaded box Ctrl-C reached 3-epoch trials only after they had finished (the budget then met early)
    path = write(corpus, plan_text(corpus, lg="epochs = 10\n"))
    url = f"sqlite:///{corpus / 'out'}/optim.db"
    # killed (the whole process group, -9) in the middle of the first stage
    first = start_cli(["plan", path, "run", "--workers", "2"], corpus, corpus / "first.log")
    try:
        wait_for("a finished sm trial", lambda: _counts(corpus, url, "p-sm")["COMPLETE"] >= 1, timeout=240)
    finally:
        stop_group(first)
    # rerun, then Ctrl-C in the middle of the second stage: exit 130, nothing after it started
    second = start_cli(["plan", path, "run", "--workers", "2"], corpus, corpus / "second.log")
    try:
        wait_for("a running lg trial", lambda: _running(second, corpus / "second.log", url, "p-lg"), timeout=240)
        os.killpg(second.pid, signal.SIGINT)
        assert second.wait(timeout=120) == 130, (corpus / "second.log").read_text()
    finally:
        stop_group(second)
    assert "final:" not in (corpus / "second.log").read_text()
    sm = _trials(url, "p-sm")
    assert sum(state in ("COMPLETE", "PRUNED") for _, state, _ in sm) == 3, sm

    done = cli(["plan", path, "run", "--workers", "2"], corpus, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    # no stage redone: sm untouched, lg not initialised again; its workers, then the final step
    steps = [line for line in done.stdout.splitlines() if line.startswith("+ stagetune")]
    assert " --study-name p-lg " in steps[0] and " run " in steps[0], done.stdout
    assert not [step for step in steps if " p-sm " in step or " init " in step], done.stdout
    assert _trials(url, "p-sm") == sm
    lg = _trials(url, "p-lg")
    assert sum(state in ("COMPLETE", "PRUNED") for _, state, _ in lg) == 2, lg  # the budget, exactly
    # every trial Ctrl-C handed back was retried to the end (none left running or waiting)
    retried = [attrs.get("failed_trial") for _, state, attrs in lg if state in ("COMPLETE", "PRUNED")]
    assert sorted(n for n, state, _ in lg if state == "FAIL") == sorted(n for n in retried if n is not None), lg
    result = json.loads((corpus / "out" / "final" / "result.json").read_text())
    assert result["study"] == "p-lg" and 0 <= result["test"]["rate"]
    assert f"final: model {corpus / 'out' / 'final' / 'model.pt'}" in done.stdout

    # a finished plan: a rerun starts nothing and changes nothing (its speed is not timed here:
    # on a loaded 2-core box interpreter start alone varies by seconds)
    stamp = (corpus / "out" / "final" / "result.json").stat().st_mtime_ns
    again = cli(["plan", path, "run"], corpus, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "+ stagetune" not in again.stdout  # no step started
    assert (corpus / "out" / "final" / "result.json").stat().st_mtime_ns == stamp

    status = cli(["plan", path, "status", "--json"], corpus)
    table = json.loads(status.stdout)
    assert [(s["stage"], s["state"], s["finished"], s["budget"]) for s in table["stages"]] == [
        ("sm", "done", 3, 3), ("lg", "done", 2, 2)]
    assert table["final"]["state"] == "trained" and table["final"]["test_error"] == result["test"]["rate"]

    # a changed plan is refused with the differences, --force takes what is safe
    changed = write(corpus, plan_text(corpus, sm_trials=4))
    refused = cli(["plan", changed, "run"], corpus)
    assert refused.returncode == 2
    assert "num_trials: 3 -> 4" in refused.stderr and "--force" in refused.stderr


def test_plan_run_gpus_without_a_cuda_device_is_refused_before_anything_starts(corpus: Path) -> None:
    import torch

    if torch.cuda.device_count():
        pytest.skip("a CUDA device is visible")
    done = cli(["plan", write(corpus, plan_text(corpus)), "run", "--gpus", "0"], corpus)
    # optim run --gpus's own check, before any stage starts
    assert_one_line_error(done, "--gpus 0: no CUDA device is visible here; drop --gpus to train on the CPU")
    assert done.returncode == 2 and "+ stagetune" not in done.stdout
    assert not (corpus / "out").exists()


def test_a_stage_derived_from_a_narrowed_stage_keeps_its_narrowed_ranges(corpus: Path) -> None:
    # md: what `optim init --from-study sm --narrow ...` (plan: narrow = Q) stores, with told trials inside
    url = f"sqlite:///{corpus / 'optim.db'}"
    spec = create_study(url, "md", corpus / "train", whitelist=LR_DOMINATED, num_trials=8, pruner="none")
    ranges = {"training.learning_rate": [0.001, 0.005], "training.dropout_prob": [0.1, 0.3]}
    origin = {"study": "sm", "quantile": 0.25, "trials": [2, 5]}
    with opened_study(url, "md") as study:
        store_spec_json(study._storage, study._study_id, {**spec.to_json(), "ranges": ranges, "narrowed_from": origin})
        study.sampler = optuna.samplers.RandomSampler(seed=0)
        for _ in range(8):
            trial = study.ask()
            study.tell(trial, lr_dominated(sample_values(trial, spec.config(), spec.tuned, ranges)))
    # lg from md without narrow = ...: md's ranges, not the declared ones, for what lg tunes
    done = cli(["optim", "--study-name", "lg", url, "init", "--from-study", "md", "--whitelist",
                "training\\.learning_rate", "model\\.recurrent_type"], corpus)
    assert done.returncode == 0, done.stderr
    lg = read_spec(url, "lg")
    assert lg["ranges"] == {"training.learning_rate": [0.001, 0.005]} and lg["narrowed_from"] == origin
    assert "kept training.learning_rate narrowed to [0.001, 0.005], as in study 'md'" in done.stderr
