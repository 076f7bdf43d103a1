"""nnU-Net finds the trainers: through the trainer folder, and after ``pip install`` with no variable at all."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nnunet_sassnet import discovery

REPO = Path(__file__).resolve().parents[1]

# run in fresh interpreters: what nnU-Net's lookup finds, and where each class's module lives
LOOKUP_SCRIPT = """
import json, os, sys
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

def origin(cls):
    # nnU-Net forgets the modules it imported from an external folder: the user's class records its file
    module = sys.modules.get(cls.__module__)
    return module.__file__ if module is not None else cls.origin

result = {"nnUNet_extTrainer": os.environ.get("nnUNet_extTrainer")}
for name in sys.argv[1:]:
    result[name] = origin(recursive_find_trainer_class_by_name(name))
result["demo_imported"] = sorted(m for m in sys.modules if m.startswith("nnunet_sassnet.demo"))
result["excepthook_replaced"] = sys.excepthook is not sys.__excepthook__
print("LOOKUP " + json.dumps(result))
"""


def lookup(python: str, names: list[str], env: dict, cwd: Path) -> dict:
    """Run nnU-Net's trainer lookup for ``names`` in a new interpreter; the class files and the variable.

    ``python -c`` puts its working directory first on ``sys.path``: ``cwd`` must not hold a package copy.
    """
    result = subprocess.run([python, "-c", LOOKUP_SCRIPT, *names], env=env, cwd=cwd, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("LOOKUP "))
    return json.loads(line[len("LOOKUP "):])


def variable_at_start(python: str, env: dict, cwd: Path) -> str | None:
    """``nnUNet_extTrainer`` as a new interpreter sees it after start-up."""
    code = "import json, os; print(json.dumps(os.environ.get('nnUNet_extTrainer')))"
    return json.loads(subprocess.run([python, "-c", code], env=env, cwd=cwd, capture_output=True, text=True,
                                     check=True).stdout)


def test_every_trainer_is_found_through_the_trainer_folder(monkeypatch):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    import nnunet_sassnet.demo.trainers as demo
    import nnunet_sassnet.variants as variants
    from nnunet_sassnet.trainers import nnUNetTrainerSASSNet

    monkeypatch.setenv("nnUNet_extTrainer", discovery.trainer_dir())
    for module in (variants, demo):
        for name in module.__all__:
            found = recursive_find_trainer_class_by_name(name)
            assert found is getattr(module, name) and found.__name__ == name
    expected = {"nnUNetTrainerSASSNetPaper": 0.001, "nnUNetTrainerSASSNetBeta005": 0.05,
                "nnUNetTrainerSASSNetBeta015": 0.15}
    for name, beta_max in expected.items():
        cls = getattr(variants, name)
        assert issubclass(cls, nnUNetTrainerSASSNet) and cls.adversarial_weight_max == beta_max
    assert issubclass(demo.nnUNetTrainerSASSNet_demo, demo.nnUNetTrainerSASSNetCPU)


def test_looking_up_the_main_trainers_does_not_import_the_demo():
    env = {k: v for k, v in os.environ.items()}
    env["nnUNet_extTrainer"] = discovery.trainer_dir()
    found = lookup(sys.executable, ["nnUNetTrainerSASSNet", "nnUNetTrainerSASSNetPaper",
                                    "nnUNetTrainerSASSNet_smoke"], env, REPO)
    assert found["demo_imported"] == []
    assert not found["excepthook_replaced"]  # importing the trainers changes nothing global
    assert Path(found["nnUNetTrainerSASSNet"]).is_relative_to(REPO / "nnunet_sassnet" / "trainers")


# what nnU-Net's lookup imports beyond what nnU-Net imports anyway: a lookup always imports nnU-Net's own trainer
# module first (whose logger imports matplotlib.pyplot and seaborn), so only the modules added after it count
LOOKUP_IMPORTS_SCRIPT = """
import json, sys
import nnunetv2.training.nnUNetTrainer.nnUNetTrainer
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

before = set(sys.modules)
found = recursive_find_trainer_class_by_name("nnUNetTrainerSASSNet_demo")
try:  # a name in no module: the lookup imports every module of every trainer folder
    recursive_find_trainer_class_by_name("nnUNetTrainerInNoFolder")
except RuntimeError:
    pass
print("IMPORTS " + json.dumps({"found": found.__module__ + "." + found.__name__,
                               "added": sorted(set(sys.modules) - before)}))
"""


def test_trainer_lookup_imports_trainers_only():
    """Any lookup (nnUNetv2_train, _predict) imports this package's trainers and nothing of its tools: not the
    demo's data generator or pipeline, the evaluator, the converter (h5py), nor matplotlib beyond nnU-Net's own."""
    env = {**os.environ, "nnUNet_extTrainer": discovery.trainer_dir()}
    result = subprocess.run([sys.executable, "-c", LOOKUP_IMPORTS_SCRIPT], env=env, cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("IMPORTS "))
    imports = json.loads(line[len("IMPORTS "):])
    assert imports["found"] == "nnunet_sassnet.demo.trainers.nnUNetTrainerSASSNet_demo"
    added = imports["added"]
    assert "nnunet_sassnet.trainers.sassnet" in added  # the lookup did import this package's trainers
    tools = ("nnunet_sassnet.demo.synthetic_la", "nnunet_sassnet.demo.pipeline", "nnunet_sassnet.demo.runner",
             "nnunet_sassnet.demo.figure", "nnunet_sassnet.evaluation", "nnunet_sassnet.conversion", "h5py",
             "matplotlib")
    assert [m for m in added if m.startswith(tools)] == []


def test_trainer_dir_check_command(monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_extTrainer", os.pathsep.join(["/elsewhere", discovery.trainer_dir()]))
    assert discovery.trainer_dir_entry(["--check"]) == 0
    monkeypatch.setenv("nnUNet_extTrainer", "/elsewhere")
    assert discovery.trainer_dir_entry(["--check"]) == 1
    assert capsys.readouterr().err.startswith("error: nnUNet_extTrainer does not list ")
    assert discovery.trainer_dir_entry([]) == 0
    assert capsys.readouterr().out.strip() == discovery.trainer_dir()


def _copy_checkout(dest: Path) -> Path:
    """The files a build needs, so that building writes nothing into the checkout."""
    dest.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    shutil.copytree(REPO / "nnunet_sassnet", dest / "nnunet_sassnet",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def _pip(python: str, *args: str) -> None:
    # --ignore-installed: this environment's own nnunet-sassnet (visible through --system-site-packages) is left
    # alone; --no-deps --no-build-isolation: torch and nnU-Net come from the system site-packages, nothing is
    # downloaded
    result = subprocess.run([python, "-m", "pip", *args], cwd=Path(python).parents[2], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"pip {' '.join(args)}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("editable", [False, True], ids=["wheel", "editable"])
def test_pip_install_lets_stock_nnunet_find_the_trainers_without_the_variable(tmp_path, editable):
    src = _copy_checkout(tmp_path / "src")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                   check=True, timeout=120)
    python = str(venv / "bin" / "python")
    site_packages = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                        capture_output=True, text=True, check=True).stdout.strip())
    install = ["install", "-q", "--no-deps", "--no-build-isolation", "--ignore-installed"]
    if editable:
        _pip(python, *install, "-e", str(src))
        folder = src / "nnunet_sassnet" / discovery.TRAINER_FOLDER
    else:
        _pip(python, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src))
        _pip(python, *install, str(next((tmp_path / "dist").glob("nnunet_sassnet-*.whl"))))
        folder = site_packages / "nnunet_sassnet" / discovery.TRAINER_FOLDER
    assert (site_packages / discovery.STARTUP_FILE).is_file()

    # no variable: the stock lookup (nnUNetv2_train, _predict, _find_best_configuration all use it) finds them
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}
    found = lookup(python, ["nnUNetTrainerSASSNet", "nnUNetTrainerSASSNet_demo"], env, tmp_path)
    assert found["nnUNet_extTrainer"].split(os.pathsep)[0] == str(folder)
    assert Path(found["nnUNetTrainerSASSNet"]).is_relative_to(folder.parent)
    # the user's own folders stay, first, and their trainers are found too (the lookup itself once: it imports
    # torch and nnU-Net, seconds of CPU time each)
    user = tmp_path / "my_trainers"
    user.mkdir()
    (user / "my_trainers.py").write_text(
        "from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer\n\n\n"
        "class nnUNetTrainerMine(nnUNetTrainer):\n    origin = __file__\n")
    user_env = {**env, "nnUNet_extTrainer": str(user)}
    if editable:
        found = {"nnUNet_extTrainer": variable_at_start(python, user_env, tmp_path)}
    else:
        found = lookup(python, ["nnUNetTrainerMine", "nnUNetTrainerSASSNet"], user_env, tmp_path)
        assert Path(found["nnUNetTrainerMine"]).parent == user
        assert Path(found["nnUNetTrainerSASSNet"]).is_relative_to(folder.parent)
    folders = found["nnUNet_extTrainer"].split(os.pathsep)
    assert folders[:2] == [str(user), str(folder)] and folders.count(str(folder)) == 1
    # a child interpreter inherits the variable and does not add the folder again
    assert variable_at_start(python, {**env, "nnUNet_extTrainer": found["nnUNet_extTrainer"]}, tmp_path) == \
        found["nnUNet_extTrainer"]

    _pip(python, "uninstall", "-y", "-q", "nnunet-sassnet")
    assert not (site_packages / discovery.STARTUP_FILE).exists()
    assert str(folder) not in str(variable_at_start(python, env, tmp_path))
