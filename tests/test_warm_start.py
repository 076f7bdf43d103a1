"""Commands started from the warm fork server behave like fresh processes of the same command."""
from __future__ import annotations

import collections
import os
import signal
import site
import sys
import threading
import time

import pytest

from nnunet_sassnet import nnunet_tools as tools
from nnunet_sassnet import warm_start
from nnunet_sassnet.discovery import STARTUP_FILE, trainer_dir


def _warm_env(**extra: str) -> dict:
    return {**os.environ, warm_start.ENV_VARIABLE: "1", **extra}


def test_entry_of_reads_console_scripts_and_entry_commands():
    assert warm_start.entry_of(["nnUNetv2_train", "1", "3d_fullres", "0"]) == \
        ("nnunetv2.run.run_training", "run_training_entry", ["1", "3d_fullres", "0"])
    command = tools.tool_command("nnUNetv2_predict", ["-i", "a b", "-o", "it's"])
    assert warm_start.entry_of(command) == \
        ("nnunetv2.inference.predict_from_raw_data", "predict_entry_point", ["-i", "a b", "-o", "it's"])
    # anything else starts as a plain process: a path, another interpreter, an unknown name, other code
    assert warm_start.entry_of([os.path.join("venv", "bin", "nnUNetv2_train")]) is None
    assert warm_start.entry_of(["/other/python", "-c", command[2]]) is None
    assert warm_start.entry_of(["no_such_console_script_here"]) is None
    assert warm_start.entry_of([sys.executable, "-c", "print(1)"]) is None
    assert not warm_start.enabled({warm_start.ENV_VARIABLE: "0"}) and warm_start.enabled(_warm_env())


def test_each_warm_command_reads_its_own_nnunet_folders(tmp_path):
    """nnunetv2.paths reads the folders when imported: in the command's process, after its environment is set."""
    outputs = []
    for name in ("first", "second"):
        folders = {key: str(tmp_path / name / key) for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
        result = tools.run_tool(tools.tool_command("nnUNetv2_train", ["999", "3d_fullres", "0"]),
                                _warm_env(**folders), tail_lines=1000)
        assert result.returncode == 1, result.tail  # nnU-Net's own error for an unknown dataset
        outputs.append("\n".join(result.tail))
        assert f"nnUNet_raw={folders['nnUNet_raw']}" in outputs[-1]
    assert str(tmp_path / "first") not in outputs[1]


def test_warm_command_has_a_process_group_of_its_own_and_stops_at_the_time_limit(tmp_path):
    start = time.monotonic()
    # signal.pause() waits for a signal: only the time limit's SIGTERM to the command's group ends it
    result = tools.run_tool(tools.entry_command("signal", "pause", []), _warm_env(), tmp_path / "log.txt",
                            timeout=3)
    assert result.timed_out and result.returncode == -signal.SIGTERM
    assert time.monotonic() - start < 30
    assert (tmp_path / "log.txt").read_text().startswith("$ ")


def test_warm_command_gets_the_trainer_folder_like_a_fresh_interpreter():
    """The startup file ran in the fork server; the command's replaced environment gets its effect again."""
    if not any(os.path.isfile(os.path.join(d, STARTUP_FILE)) for d in site.getsitepackages()):
        pytest.skip("this installation has no startup file (e.g. pip install --target)")
    env = _warm_env()
    env.pop("nnUNet_extTrainer", None)
    # nnunet_sassnet_trainer_dir fails where nnUNet_extTrainer does not list the trainer folder
    result = tools.run_tool(["nnunet_sassnet_trainer_dir"], env)
    assert result.ok, result.tail
    assert result.tail[-1].strip() == trainer_dir()


def test_commands_started_and_ended_from_several_threads_keep_their_exit_status():
    """The suite starts commands from two threads at once (tests/conftest.py's lane): a command that ends while
    another thread starts one still reports its own exit status (it was 255 for about one in ten)."""
    statuses: list[int] = []

    def start_commands() -> None:
        for _ in range(20):
            # gc.enable returns None at once: a command that exits 0 within milliseconds
            process = warm_start.WarmProcess("gc", "enable", [], _warm_env(), None)
            process.stdout.read()
            statuses.append(process.wait(timeout=60))

    threads = [threading.Thread(target=start_commands) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [0] * 60, collections.Counter(statuses)
