"""One runner for many training runs: Ray Tune, on this machine by default or on a cluster.

`run_trials` takes a trainable and a list of trials (dicts with a unique `label`, which names
the trial and its directory) and runs them as one Tune experiment at `storage/name`: one CPU
per trial by default, as many at once as `workers` (or the cluster's CPUs) allow. A trial
that raises is reported as failed and the others go on. Calling it again with the same trials
resumes the experiment: finished trials are skipped, unfinished and failed ones run again.
`mu sweep` and `benchmarks/train_vs_sb3.py` both run through here.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray
from ray import tune

from controller.errors import UsageError

log = logging.getLogger(__name__)


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class RunnerConfig:
    name: str = _f("sweep", "Experiment name: its directory is STORAGE/NAME.")
    storage: str = _f(
        "runs/sweeps",
        "Where results go: a local path, a path every node mounts, or a URI (s3://, gs://).",
    )
    address: str | None = _f(
        None, "Ray cluster to join (HOST:6379); default: RAY_ADDRESS, else a local Ray."
    )
    workers: int | None = _f(None, "Trials at once; default: as many as the CPUs allow.")
    cpus_per_trial: float = _f(1.0, "CPUs reserved per trial (a run uses one torch thread).")
    reuse_workers: bool = _f(
        False, "Run trials one after another in the same worker process (imports paid once)."
    )

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise UsageError(f"runner name must be a non-empty directory name, got {self.name!r}")
        if self.workers is not None and self.workers < 1:
            raise UsageError(f"workers must be >= 1, got {self.workers}")
        if self.cpus_per_trial <= 0:
            raise UsageError(f"cpus_per_trial must be > 0, got {self.cpus_per_trial}")

    @property
    def storage_uri(self) -> str:
        """`storage` as Ray wants it: URIs as given, local paths absolute."""
        return self.storage if "://" in self.storage else str(Path(self.storage).resolve())

    @property
    def experiment(self) -> str:
        return f"{self.storage_uri.rstrip('/')}/{self.name}"


def trial_label(trial: Any) -> str:
    """A trial's name and directory: its `label` (module level, so a resumed experiment can
    unpickle it)."""
    return trial.config["trial"]["label"]


def error_line(text: str) -> str:
    """The exception line of a traceback (the last `Name: message` line), for a one-line
    report."""
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if (
            head
            and head.replace(".", "").isidentifier()
            and ("Error" in head or "Exception" in head)
        ):
            return line
    return lines[-1] if lines else "unknown error"


class Progress(tune.Callback):
    """One line per trial start, evaluation, finish and failure, instead of Tune's tables."""

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        log.info("%s: started", trial_label(trial))

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        if "step" in result and not result.get("final"):
            log.info("%s: step %d, %s", trial_label(trial), result["step"], describe(result))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        log.info("%s: finished, %s", trial_label(trial), describe(result))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        path = trial.error_file
        text = Path(path).read_text() if path and os.path.exists(path) else "see its error.txt"
        log.warning("%s: FAILED: %s", trial_label(trial), error_line(text))


def describe(result: dict) -> str:
    if "return" not in result:
        return "no evaluation yet"
    text = f"return {result['return']:.3g}"
    if result.get("success_rate") is not None:
        text += f", success {result['success_rate']:.2f}"
    return text


def run_trials(
    trainable: Callable[[dict], None],
    trials: list[dict],
    runner: RunnerConfig,
    *,
    metric: str | None = None,
    mode: str = "max",
    scheduler: Any = None,
) -> tune.ResultGrid:
    """Run `trainable({"trial": t})` for every `t` in `trials` as one Tune experiment (see the
    module doc); resumes the experiment at `runner.experiment` when it holds these trials."""
    labels = [t["label"] for t in trials]
    if len(set(labels)) != len(labels):
        raise UsageError(f"trial labels must be unique, got {labels}")
    _init_ray(runner)
    fs, exp_path = pyarrow.fs.FileSystem.from_uri(runner.experiment)
    fn = tune.with_resources(trainable, {"cpu": runner.cpus_per_trial})
    param_space = {"trial": tune.grid_search(trials)}
    spec = json.dumps(trials, sort_keys=True, indent=1)
    if tune.Tuner.can_restore(runner.experiment):
        with fs.open_input_stream(f"{exp_path}/trials.json") as f:
            if f.read().decode() != spec:
                raise UsageError(
                    f"{runner.experiment} holds an experiment with other trials; give another "
                    "name, or remove it to start over"
                )
        log.info("resuming %s: finished trials are kept, the others run", runner.experiment)
        tuner = tune.Tuner.restore(
            runner.experiment,
            fn,
            resume_unfinished=True,
            restart_errored=True,  # a failure may have been the machine's, not the config's
            param_space=param_space,
        )
    else:
        fs.create_dir(exp_path, recursive=True)
        with fs.open_output_stream(f"{exp_path}/trials.json") as f:
            f.write(spec.encode())
        tuner = tune.Tuner(
            fn,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=metric,
                mode=mode if metric else None,
                scheduler=scheduler,
                max_concurrent_trials=runner.workers,
                reuse_actors=runner.reuse_workers,
                trial_name_creator=trial_label,
                trial_dirname_creator=trial_label,
            ),
            run_config=tune.RunConfig(
                name=runner.name,
                storage_path=runner.storage_uri,
                verbose=0,  # Progress prints one line per event instead
                callbacks=[Progress()],
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )
    log.info("%d trials in %s on %s", len(trials), runner.experiment, runner.address or "local Ray")
    return tuner.fit()


def _quiet_tune() -> None:
    """Tune's console output, minus what `Progress` says in one line: its banner and tables
    (the older reporter, at verbose=0, prints none) and each failure's traceback (kept in the
    trial's error.txt)."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    for name in ("ray.tune.execution.tune_controller", "ray.tune.tune"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _init_ray(runner: RunnerConfig) -> None:
    _quiet_tune()
    if ray.is_initialized():
        return
    # worker output stays in Ray's session logs (/tmp/ray/session_latest/logs); trials report
    # through Tune, and a failure's traceback lands in its trial's error.txt
    common = {"log_to_driver": False, "logging_level": logging.WARNING}
    address = runner.address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, **common)
        except ConnectionError as err:
            # Ray sends its token only where RAY_AUTH_MODE=token says so (never by default to
            # an address given explicitly), and a head runs with token auth by default
            raise ConnectionError(
                f"{err}. If the cluster uses token authentication (Ray's default), set "
                "RAY_AUTH_MODE=token here, with the head's token (`ray get-auth-token` there) "
                "in ~/.ray/auth_token or RAY_AUTH_TOKEN (docs/deployment.md)"
            ) from None
    else:
        # "local": a Ray of our own even where `ray start` runs one here (plain ray.init()
        # would join it); no dashboard and a small object store: trials pass metrics, not data
        ray.init(
            address="local",
            include_dashboard=False,
            object_store_memory=100 * 2**20,
            **common,
        )
