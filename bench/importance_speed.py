"""`stagetune optim important` on a 1000-trial SQLite study: seconds and determinism.

    python bench/importance_speed.py [--trials 1000] [--evaluator ped-anova]

Builds the study once (init on a tiny generated Kaldi dir, then trials added
through optuna with values from a smooth function of the sampled parameters),
then times the real CLI twice and checks both outputs are identical.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fixtures_data import random_feats, write_data_dir  # noqa: E402

from stagetune.optim.sampling import sample_values  # noqa: E402
from stagetune.optim.study import read_spec  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--evaluator", default="ped-anova")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        feats, utt2spk = random_feats(num_utts=20)
        rng = np.random.default_rng(0)
        text = {u: list(rng.choice(list("ABCDE"), size=3)) for u in feats}
        write_data_dir(tmp / "data", feats, text, utt2spk=utt2spk)
        url = f"sqlite:///{tmp}/big.db"
        cli = [sys.executable, "-m", "stagetune"]
        subprocess.run([*cli, "optim", url, "init", str(tmp / "data"), "--num-trials", str(args.trials)],
                       check=True, capture_output=True)
        storage = optuna.storages.RDBStorage(url)
        spec = read_spec(storage, "big", url)
        base = spec.config()
        study = optuna.load_study(study_name="big", storage=storage,
                                  sampler=optuna.samplers.RandomSampler(seed=0))
        began = time.perf_counter()
        mem = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        for i in range(args.trials):
            t = mem.ask()
            values = sample_values(t, base, spec.tuned)
            lr = values.get("training.learning_rate", 1e-3)
            value = (np.log10(lr) + 3) ** 2 + 0.1 * values.get("model.recurrent_layers", 1) + rng.normal(0, 0.05)
            mem.tell(t, float(value))
        study.add_trials(mem.trials)
        print(f"built a {args.trials}-trial study in {time.perf_counter() - began:.1f} s")
        outputs, seconds = [], []
        for _ in range(2):
            began = time.perf_counter()
            done = subprocess.run([*cli, "optim", url, "important", "--evaluator", args.evaluator],
                                  check=True, capture_output=True, text=True)
            seconds.append(time.perf_counter() - began)
            outputs.append(done.stdout)
        print(f"command: stagetune optim {url.replace(str(tmp), 'TMP')} important --evaluator {args.evaluator}")
        print(f"seconds (process start included): {seconds[0]:.2f}, {seconds[1]:.2f}")
        print(f"identical output on both runs: {outputs[0] == outputs[1]}")
        print("top 5:", ", ".join(outputs[0].split()[:5]))


if __name__ == "__main__":
    main()
