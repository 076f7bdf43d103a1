"""Shared fixtures: nnU-Net's folders in a temporary place, and tiny planned datasets."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Callable

import pytest

# pytest puts this folder on sys.path (rootdir-relative "prepend" import mode), so helpers import directly
from synthetic import make_dataset

from nnunet_sassnet import nnunet_tools as tools
from nnunet_sassnet import warm_start
from nnunet_sassnet.plans import derive_small_plans

# nnU-Net's commands start from a warm fork server (nnunet_sassnet/warm_start.py): the same entry functions, each
# in a process of its own with its own environment, without importing torch, nnU-Net and matplotlib again for
# every command (~10 s each on two cores). The demo's and the benchmark's processes inherit the switch.
# run(..., plain=True) starts the installed console script as a fresh interpreter instead (the stock-CLI tests);
# NNUNET_SASSNET_WARM_START=0 turns it off for the whole run.
os.environ.setdefault(warm_start.ENV_VARIABLE, "1")

# The real LA data: $NNUNET_SASSNET_DATA, else ../shared/data beside the checkout. Tests that read it carry
# @pytest.mark.needs_la_data(folder, ...) and are skipped, with the reason shown (-rs), where it is absent.
SHARED_DATA = Path(os.environ.get("NNUNET_SASSNET_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
LA_H5 = SHARED_DATA / "la2018_uamt_h5" / "2018LA_Seg_Training Set"
LA_LITE = SHARED_DATA / "la2018_uamt_lite_1.25mm"
LA_LITE_H5 = LA_LITE / "2018LA_Seg_Training Set"
SMALL_PLANS = "nnUNetPlansSmall"


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip a test marked ``needs_la_data(folder, ...)`` (default: the data root) whose folders are absent."""
    for marker in item.iter_markers("needs_la_data"):
        missing = [Path(f) for f in (marker.args or (SHARED_DATA,)) if not Path(f).is_dir()]
        if missing:
            pytest.skip(f"real LA data not found at {missing[0]} (set NNUNET_SASSNET_DATA to the folder holding "
                        f"la2018_uamt_h5 and la2018_uamt_lite_1.25mm)")


def run(cmd: list[str], env: dict, check: bool = True, timeout: int = 600,
        plain: bool = False) -> subprocess.CompletedProcess:
    """Run a command line tool (stopped with its workers after ``timeout`` s); on failure show its output.

    ``plain``: the installed console script in a fresh interpreter, not from the warm fork server.
    """
    if plain:
        env = {**env, warm_start.ENV_VARIABLE: "0"}
    result = tools.run_tool(cmd, env, timeout=timeout, tail_lines=100_000)
    output = "\n".join(result.tail)
    if check and not result.ok:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.error}):\n{output[-6000:]}")
    # stdout and stderr arrive as one stream (their order kept); both fields hold it
    return subprocess.CompletedProcess(cmd, result.returncode, output, output)


def nnunet_environment(root: Path) -> dict:
    """Environment for nnU-Net commands with all folders under ``root``, tuned for 2 CPU cores."""
    return tools.nnunet_environment(root / "raw", root / "preprocessed", root / "results", default_workers=1,
                                    threads=2)


def training_environment(env: dict) -> dict:
    """nnU-Net's planner needs >= 1 augmentation process; training in tests runs augmentation in-process."""
    return {**env, "nnUNet_n_proc_DA": "0"}


def plan_tiny_dataset(root: Path, dataset_id: int, patch_size=(16, 16, 16), configuration: str = "3d_fullres",
                      patch_size_2d: tuple[int, int] | None = None, **dataset_kwargs) -> dict:
    """Create, plan (nnUNetv2_plan_and_preprocess) and preprocess a tiny dataset with small plans.

    ``patch_size_2d``: the small plans get the 2d configuration as well, preprocessed in the same call (nnU-Net's
    planner writes every configuration into nnUNetPlans; ``-c`` only selects what it preprocesses).
    """
    env = nnunet_environment(root)
    make_dataset(env["nnUNet_raw"], dataset_id, **dataset_kwargs)
    # without --verify_dataset_integrity (17 s here): the converter's output is verified in test_conversion.py
    run(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", configuration, "-np", "1", "--no_pp"], env)
    name = next(p.name for p in (root / "preprocessed").iterdir() if p.name.startswith(f"Dataset{dataset_id:03d}"))
    base = root / "preprocessed" / name
    derive_small_plans(str(base), patch_size, configuration=configuration, target_plans=SMALL_PLANS)
    configurations = [configuration]
    if patch_size_2d is not None:
        # derive 2d into a file of its own, then merge it into the small plans
        derive_small_plans(str(base), patch_size_2d, configuration="2d", target_plans=f"{SMALL_PLANS}2d")
        small = json.loads((base / f"{SMALL_PLANS}.json").read_text())
        small["configurations"]["2d"] = json.loads((base / f"{SMALL_PLANS}2d.json").read_text())["configurations"]["2d"]
        small["configurations"]["2d"]["data_identifier"] = f"{SMALL_PLANS}_2d"
        (base / f"{SMALL_PLANS}.json").write_text(json.dumps(small, indent=2))
        configurations.append("2d")
    run(["nnUNetv2_preprocess", "-d", str(dataset_id), "-plans_name", SMALL_PLANS, "-c", *configurations,
         "-np", *["1"] * len(configurations)], env)
    return {"env": env, "root": root, "dataset_id": dataset_id, "dataset_name": name,
            "configuration": configuration}


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> dict:
    """A planned binary 3D dataset: 5 labeled, 4 unlabeled, 2 test cases of 24^3 voxels."""
    return plan_tiny_dataset(tmp_path_factory.mktemp("nnunet"), 990, n_labeled=5, n_unlabeled=4, n_test=2)


SMOKE_TRAINER = "nnUNetTrainerSASSNet_smoke"


@pytest.fixture(scope="session")
def sassnet_fold0(tiny_dataset, started_early) -> dict:
    """``nnUNetv2_train 990 3d_fullres 0 -tr nnUNetTrainerSASSNet_smoke`` on the tiny dataset, once per session.

    The command-line test checks this training; the export test starts from its model (a training costs
    about a minute on two cores). It starts with the session (see :func:`start_sassnet_fold0`).
    """
    return started_early["sassnet_fold0"].result()


@pytest.fixture()
def nnunet_paths(tiny_dataset, monkeypatch):
    """Point this process's nnU-Net at the tiny dataset's folders (for in-process trainers)."""
    env = training_environment(tiny_dataset["env"])
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer", "nnUNet_compile",
                "nnUNet_n_proc_DA", "nnUNet_def_n_proc"):
        monkeypatch.setenv(key, env[key])
    return tiny_dataset


class EarlyStart:
    """A session fixture's work, run in a thread from the session's start; :meth:`result` waits for it.

    Two cores and a suite whose long parts mostly keep one of them busy (a fresh interpreter importing torch,
    nnU-Net's worker processes starting one after the other, the demo's one-thread training): the shared
    training and the quick demo run beside the first tests instead of before the tests that need them
    (suite on two cores: 16 min 43 s with neither started early, 14 min 45 s with both; planning the tiny
    dataset early as well measured no better, 15 min 18 s). Commands started through :meth:`command` are
    stopped when the session ends first.
    """

    def __init__(self, name: str, work: Callable[["EarlyStart"], object]):
        self._processes: list[subprocess.Popen] = []
        self._outcome: object = None
        self._failed = False
        self._thread = threading.Thread(target=self._run, args=(work,), name=f"early-{name}", daemon=True)
        self._thread.start()

    def _run(self, work) -> None:
        try:
            self._outcome = work(self)
        except BaseException as e:  # noqa: BLE001 -- raised again in the test that needs the result
            self._outcome, self._failed = e, True

    def result(self):
        """What the work returned; raises what it raised."""
        self._thread.join()
        if self._failed:
            raise self._outcome
        return self._outcome

    def command(self, cmd: list[str], cwd: Path | None, env: dict, timeout: float,
                merge_output: bool = False) -> subprocess.CompletedProcess:
        """Run ``cmd`` in a session of its own; ``merge_output``: stderr arrives in stdout, in order (both fields
        of the result hold it, as with :func:`run`)."""
        process = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT if merge_output else subprocess.PIPE,
                                   stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        self._processes.append(process)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        finally:
            self.stop()
        return subprocess.CompletedProcess(cmd, process.returncode, stdout, stdout if merge_output else stderr)

    def stop(self) -> None:
        """End the commands still running, with the processes they started."""
        for process in self._processes:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


#: fixture name -> (the session fixtures its work needs, its work), started at the session's start when a
#: selected test uses the fixture. The work runs in a thread, so it gets no fixture request (pytest's fixtures
#: belong to the main thread) but a context: ``tmp_path_factory`` and the values of the fixtures it needs
EARLY_STARTS: dict[str, tuple[tuple[str, ...], Callable[[dict, EarlyStart], object]]] = {}


def early_start(fixture_name: str, needs: tuple[str, ...] = ()):
    """Register the work of a session fixture for :func:`started_early` (decorator); ``needs``: session
    fixtures made (in the main thread) before the work starts."""
    def register(work):
        EARLY_STARTS[fixture_name] = (needs, work)
        return work
    return register


@pytest.fixture(scope="session", autouse=True)
def started_early(request, tmp_path_factory) -> dict[str, EarlyStart]:
    """The works of :data:`EARLY_STARTS` whose fixture a selected test uses, started before the first test
    (those that need no fixture first); commands still running when the session ends are stopped."""
    wanted = {name for item in request.session.items for name in getattr(item, "fixturenames", ())}
    started: dict[str, EarlyStart] = {}
    for name, (needs, work) in sorted(EARLY_STARTS.items(), key=lambda item: bool(item[1][0])):
        if name in wanted:
            context = {"tmp_path_factory": tmp_path_factory, **{n: request.getfixturevalue(n) for n in needs}}
            started[name] = EarlyStart(name, lambda early, work=work, context=context: work(context, early))
    yield started
    for early in started.values():
        early.stop()


@early_start("sassnet_fold0", needs=("tiny_dataset",))
def start_sassnet_fold0(context: dict, early: EarlyStart) -> dict:
    """The shared training of :func:`sassnet_fold0`, as soon as the tiny dataset is planned. Plain: nnU-Net's
    installed console script in a fresh interpreter finds the trainer (stock-CLI test)."""
    tiny_dataset = context["tiny_dataset"]
    env = {**training_environment(tiny_dataset["env"]), warm_start.ENV_VARIABLE: "0"}
    cmd = ["nnUNetv2_train", "990", "3d_fullres", "0", "-tr", SMOKE_TRAINER, "-p", SMALL_PLANS, "-device", "cpu"]
    train = early.command(cmd, None, env, timeout=600, merge_output=True)
    if train.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed (exit code {train.returncode}):\n{train.stdout[-6000:]}")
    model = tiny_dataset["root"] / "results" / tiny_dataset["dataset_name"] / \
        f"{SMOKE_TRAINER}__{SMALL_PLANS}__3d_fullres"
    return {"stdout": train.stdout, "model": model, "trainer": SMOKE_TRAINER}
