"""How nnU-Net's commands find this package's trainers.

nnU-Net (2.8) looks up a trainer named by ``-tr`` (or stored in a checkpoint) in its own package and then in
the folders of the environment variable ``nnUNet_extTrainer`` (separated by ``os.pathsep``), which it reads
at every lookup. The package installs a startup file, :data:`STARTUP_FILE`, into ``site-packages``: Python
runs its one line at every interpreter start, and the line appends :func:`trainer_dir` to
``nnUNet_extTrainer`` (after the user's own folders, once). It imports nothing but ``os``, which Python has
loaded already. ``pip uninstall`` removes it with the package.

Without that file (``python -S``, a ``--target`` install, an old setuptools), set the variable by hand:
``export nnUNet_extTrainer=$(nnunet_sassnet_trainer_dir)``.
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

#: nnU-Net's variable with the folders of external trainers
ENV_VARIABLE = "nnUNet_extTrainer"
#: the folder (in this package) that holds the modules nnU-Net's lookup imports
TRAINER_FOLDER = "nnunet_trainer_folder"
#: the startup file installed into site-packages (setup.py writes it with :func:`startup_line`)
STARTUP_FILE = "nnunet_sassnet_ext_trainer.pth"


def trainer_dir() -> str:
    """The folder to put in ``nnUNet_extTrainer`` so that nnUNetv2_train/predict find our trainers."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), TRAINER_FOLDER)


def startup_line(folder_expression: str) -> str:
    """The line of :data:`STARTUP_FILE`: append the folder that ``folder_expression`` evaluates to.

    Python's ``site`` module executes lines of ``.pth`` files that start with ``import``, in the scope of its
    ``addpackage(sitedir, ...)``, so the expression may use ``sitedir`` (the ``site-packages`` folder that
    holds the file). The folder is appended only when it is not in the variable yet: every child interpreter
    (nnU-Net's workers) runs the line again with the inherited variable.
    """
    return (f"import os; (lambda d, v: d in v.split(os.pathsep) or os.environ.__setitem__({ENV_VARIABLE!r}, "
            f"v + os.pathsep + d if v else d))({folder_expression}, os.environ.get({ENV_VARIABLE!r}, ''))\n")


def trainer_dir_is_set(environ: dict | None = None) -> bool:
    """Whether ``nnUNet_extTrainer`` (of ``environ``, default this process's) lists :func:`trainer_dir`."""
    value = (os.environ if environ is None else environ).get(ENV_VARIABLE, "")
    folders = {os.path.realpath(p) for p in value.split(os.pathsep) if p.strip()}
    return os.path.realpath(trainer_dir()) in folders


def trainer_dir_entry(argv: Sequence[str] | None = None) -> int:
    """``nnunet_sassnet_trainer_dir [--check]``: print :func:`trainer_dir`, or check that nnU-Net will find it."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print("usage: nnunet_sassnet_trainer_dir [--check]\n\nPrints the folder that holds nnunet-sassnet's "
              "trainers for nnU-Net (export nnUNet_extTrainer=$(nnunet_sassnet_trainer_dir) where the "
              f"installed startup file {STARTUP_FILE} does not run).\n--check: exit 1 unless "
              "nnUNet_extTrainer lists that folder in this shell.")
        return 0
    if args == ["--check"]:
        if trainer_dir_is_set():
            print(f"nnU-Net finds nnunet-sassnet's trainers: {ENV_VARIABLE} lists {trainer_dir()}")
            return 0
        print(f"error: {ENV_VARIABLE} does not list {trainer_dir()} (is {os.environ.get(ENV_VARIABLE)!r}); "
              f"reinstall the package or run: export {ENV_VARIABLE}=$(nnunet_sassnet_trainer_dir)",
              file=sys.stderr)
        return 1
    if args:
        print(f"error: unknown arguments {' '.join(args)}; usage: nnunet_sassnet_trainer_dir [--check]",
              file=sys.stderr)
        return 2
    print(trainer_dir())
    return 0
