"""Named trainer subclasses with nnU-Net's ``__init__``-time settings (epochs, iterations, learning rate)."""
from __future__ import annotations

import torch

__all__ = ["trainer_variant"]


def trainer_variant(base: type, name: str, module: str | None = None, **settings) -> type:
    """A subclass of ``base`` named ``name`` whose instances get ``settings`` after nnU-Net's ``__init__``.

    nnU-Net assigns its schedule (``num_epochs``, ``num_iterations_per_epoch``, ``initial_lr``, ...) in
    ``__init__``, so class attributes cannot change it; this sets them afterwards. Assign the result to a
    module attribute of the same name so that nnU-Net's trainer lookup finds it.
    """
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        for key, value in settings.items():
            setattr(self, key, value)

    settings_text = ", ".join(f"{k}={v!r}" for k, v in settings.items())
    return type(name, (base,), {"__init__": __init__, "__module__": module or base.__module__,
                                "__doc__": f"{base.__name__} with {settings_text}."})
