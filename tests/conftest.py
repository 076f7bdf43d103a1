"""Shared fixtures: nnU-Net's folders in a temporary place, and tiny planned datasets."""
from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path
from typing import Callable

import pytest
import torch

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

# Two lanes of work on two cores, the tests and the background lane (see EarlyStart): one math thread each, in
# this process and in every command it starts (nnU-Net's commands keep to OMP_NUM_THREADS, nnunet_tools.
# cap_torch_threads). With two threads per command the lanes' threads wait for each other: the whole suite
# took 13:44 on two cores, with one 10:58 (2026-11-27).
os.environ.setdefault("OMP_NUM_THREADS", "1")
TEST_THREADS = int(os.environ["OMP_NUM_THREADS"])
torch.set_num_threads(TEST_THREADS)

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


def run(cmd: list[str], env: dict, check: bool = True, timeout: int = 600, plain: bool = False,
        on_start: Callable | None = None) -> subprocess.CompletedProcess:
    """Run a command line tool (stopped with its workers after ``timeout`` s); on failure show its output.

    ``plain``: the installed console script in a fresh interpreter, not from the warm fork server;
    ``on_start``: receives the started process (see :meth:`EarlyStart.track`).
    """
    if plain:
        env = {**env, warm_start.ENV_VARIABLE: "0"}
    result = tools.run_tool(cmd, env, timeout=timeout, tail_lines=100_000, on_start=on_start)
    output = "\n".join(result.tail)
    if check and not result.ok:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.error}):\n{output[-6000:]}")
    # stdout and stderr arrive as one stream (their order kept); both fields hold it
    return subprocess.CompletedProcess(cmd, result.returncode, output, output)


def nnunet_environment(root: Path, base: dict | None = None) -> dict:
    """Environment for nnU-Net commands with all folders under ``root``, tuned for 2 CPU cores; ``base``:
    the variables to start from (default this process's)."""
    return tools.nnunet_environment(root / "raw", root / "preprocessed", root / "results", base=base,
                                    default_workers=1, threads=TEST_THREADS)


def training_environment(env: dict) -> dict:
    """nnU-Net's planner needs >= 1 augmentation process; training in tests runs augmentation in-process."""
    return {**env, "nnUNet_n_proc_DA": "0"}


def plan_tiny_dataset(root: Path, dataset_id: int, patch_size=(16, 16, 16), configuration: str = "3d_fullres",
                      patch_size_2d: tuple[int, int] | None = None, base_env: dict | None = None,
                      on_start: Callable | None = None, **dataset_kwargs) -> dict:
    """Create, plan (nnUNetv2_plan_and_preprocess) and preprocess a tiny dataset with small plans.

    ``patch_size_2d``: the small plans get the 2d configuration as well, preprocessed in the same call (nnU-Net's
    planner writes every configuration into nnUNetPlans; ``-c`` only selects what it preprocesses);
    ``base_env`` and ``on_start``: see :func:`nnunet_environment` and :func:`run`.
    """
    env = nnunet_environment(root, base_env)
    make_dataset(env["nnUNet_raw"], dataset_id, **dataset_kwargs)
    # without --verify_dataset_integrity (17 s here): the converter's output is verified in test_conversion.py
    run(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", configuration, "-np", "1", "--no_pp"], env,
        on_start=on_start)
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
         "-np", *["1"] * len(configurations)], env, on_start=on_start)
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
    """A session fixture's work, queued at the session's start for the background lane (see :data:`LANE`);
    :meth:`result` waits for it, or runs it in the calling thread when the lane has not begun it yet.

    Two cores, and a suite whose long parts mostly keep one of them busy (a fresh interpreter importing torch,
    nnU-Net's worker processes starting one after the other): the long self-contained works (the benchmark's
    smoke call, the shared training, the multi-class dataset, the quick demo, the speed benchmark's calls) run
    one after the other in a second thread beside the tests, which pytest runs in the main thread with the
    modules that need these works last (:func:`pytest_collection_modifyitems`). Commands started through
    :meth:`command`, or passed to :meth:`track`, are stopped when the session ends first.
    """

    def __init__(self, name: str):
        self.name = name
        self._work: Callable[[EarlyStart], object] | None = None
        self._ready = threading.Event()  # the work is given: the fixtures it needs are made
        self._taken = threading.Lock()  # whoever holds it runs the work: the lane, or the test that needs it
        self._done = threading.Event()
        self._processes: list[subprocess.Popen] = []
        self._outcome: object = None
        self._failed = False
        self.ending = False  # the session is ending: no new command starts

    def give(self, work: Callable[["EarlyStart"], object]) -> None:
        """The work to run, once the fixtures it needs are made."""
        self._work = work
        self._ready.set()

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    def run_unless_taken(self) -> None:
        """Run the work in this thread, unless another thread has taken it."""
        if not self._taken.acquire(blocking=False):
            return
        try:
            self._outcome = self._work(self)
        except BaseException as e:  # noqa: BLE001 -- raised again in the test that needs the result
            self._outcome, self._failed = e, True
        finally:
            self._done.set()

    def result(self):
        """What the work returned (run here if the lane has not started it); raises what it raised."""
        self.run_unless_taken()
        self._done.wait()
        if self._failed:
            raise self._outcome
        return self._outcome

    def track(self, process) -> None:
        """Stop ``process`` (and its process group) with the lane's commands at the session's end (the
        ``on_start`` of :func:`run`)."""
        self._processes.append(process)
        if self.ending:  # the session ended while it started
            self.stop()

    def command(self, cmd: list[str], cwd: Path | None, env: dict, timeout: float,
                merge_output: bool = False) -> subprocess.CompletedProcess:
        """Run ``cmd`` in a session of its own; ``merge_output``: stderr arrives in stdout, in order (both fields
        of the result hold it, as with :func:`run`). Past ``timeout`` it is stopped and
        :class:`subprocess.TimeoutExpired` raised."""
        if self.ending:
            raise RuntimeError(f"{self.name}: the test session is ending; {cmd[0]} not started")
        process = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT if merge_output else subprocess.PIPE,
                                   stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        self._processes.append(process)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        finally:
            self.stop()
        return subprocess.CompletedProcess(cmd, process.returncode, stdout, stdout if merge_output else stderr)

    def end(self) -> None:
        """The session is ending: start no more commands (nor the work, if the lane has not begun it), and
        stop those running."""
        self.ending = True
        self.stop()

    def stop(self) -> None:
        """End the commands still running, with the processes they started: SIGTERM first (the benchmark
        then stops its own tools), SIGKILL after 10 s."""
        for process in self._processes:
            if process.poll() is None:
                tools.stop_process_group(process)


#: fixture name -> (the session fixtures its work needs, its work), queued at the session's start when a
#: selected test uses the fixture. The work runs in the lane's thread, so it gets no fixture request (pytest's
#: fixtures belong to the main thread) but a context: ``tmp_path_factory``, ``environ`` (this process's
#: environment when the session started: tests change ``os.environ`` meanwhile) and the values of the fixtures
#: it needs
EARLY_STARTS: dict[str, tuple[tuple[str, ...], Callable[[dict, EarlyStart], object]]] = {}

#: the background lane's order, longest works first; the modules that need them run last, in this order.
#: The whole suite on two cores (2026-11-27): 16:04 with the benchmark's smoke call and the speed benchmark in the
#: main thread and the shared training and the demo each in a thread of their own from the start; 13:44 with
#: this lane; 10:58 with this lane and one math thread per command (see OMP_NUM_THREADS above)
LANE = ("la_semisup_smoke", "sassnet_fold0", "multi_dataset", "quick_demo", "speed_smoke", "cascade_trainings")


def early_start(fixture_name: str, needs: tuple[str, ...] = ()):
    """Register the work of a session fixture for :func:`started_early` (decorator); ``needs``: session
    fixtures made (in the main thread) before the work starts. ``fixture_name`` must be listed in :data:`LANE`."""
    if fixture_name not in LANE:
        raise ValueError(f"{fixture_name}: add it to LANE in tests/conftest.py, which sets the lane's order")

    def register(work):
        EARLY_STARTS[fixture_name] = (needs, work)
        return work
    return register


def _lane_rank(item: pytest.Item) -> int:
    """0 for a test that needs no lane work, else 1 + the lane position of the last one it needs."""
    names = set(getattr(item, "fixturenames", ())) & set(EARLY_STARTS)
    return max((LANE.index(n) + 1 for n in names), default=0)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules whose tests need a lane work run after the others, in the lane's order; a module's tests stay
    together and in their order (its module fixtures are made once)."""
    ranks: dict[Path, int] = {}
    for item in items:
        ranks[item.path] = max(ranks.get(item.path, 0), _lane_rank(item))
    items.sort(key=lambda item: ranks[item.path])  # a stable sort


@pytest.fixture(scope="session", autouse=True)
def started_early(request, tmp_path_factory) -> dict[str, EarlyStart]:
    """The works of :data:`EARLY_STARTS` whose fixture a selected test uses, run one after the other by a
    background thread from before the first test (while the main thread makes the fixtures that the later
    works need); commands still running at the session's end are stopped, works not begun are dropped."""
    wanted = {name for item in request.session.items for name in getattr(item, "fixturenames", ())}
    environ = dict(os.environ)
    started = {name: EarlyStart(name) for name in LANE if name in EARLY_STARTS and name in wanted}

    def lane() -> None:
        for early in started.values():
            while not (early.wait_ready(timeout=0.5) or early.ending):
                pass
            if early.ending:
                return
            early.run_unless_taken()

    # the base folder is made once, here: pytest makes it on first use without a lock, so a lane work and a
    # fixture of the main thread that both asked first would each make one (and mktemp then fails)
    tmp_path_factory.getbasetemp()
    threading.Thread(target=lane, name="test-lane", daemon=True).start()
    try:
        # works without needs first: the lane starts them while the main thread makes the others' fixtures
        for name in sorted(started, key=lambda n: bool(EARLY_STARTS[n][0])):
            needs, work = EARLY_STARTS[name]
            context = {"tmp_path_factory": tmp_path_factory, "environ": environ,
                       **{n: request.getfixturevalue(n) for n in needs}}
            started[name].give(lambda early, work=work, context=context: work(context, early))
        yield started
    finally:
        for early in started.values():
            early.end()


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
