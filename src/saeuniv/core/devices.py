"""Where the array work of the core runs: numpy on this machine's CPU, or torch on a device.

Core functions that can run on a GPU take ``device``: ``None`` keeps their numpy path (the
reference, used wherever no GPU is asked for), a torch device (``"cpu"``, ``"cuda"``,
``"cuda:1"``) runs their torch path there. The torch path on ``"cpu"`` is how it is tested on
machines without a GPU. torch is imported only when a device is named.
"""

from __future__ import annotations

SETTINGS = ("auto", "cpu", "cuda")  # execution.device


def torch_device(device):
    """``None`` for the numpy path, else the ``torch.device`` named, checked to be present.

    Parameters
    ----------
    device : None, str or torch.device

    Returns
    -------
    torch.device or None

    Raises
    ------
    ValueError
        If the name is not a torch device, or names a GPU this process cannot see.
    """
    if device is None:
        return None
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a torch device; use None (numpy), "
                         f"'cpu' or 'cuda'") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for but no GPU is visible; use "
                             f"None (numpy) or 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} GPU(s) "
                             f"are visible")
    return dev


def analysis_device(setting: str):
    """The ``device`` argument for an ``execution.device`` setting.

    ``auto``: the first GPU when one is visible, else ``None`` (numpy); ``cpu``: ``None``;
    ``cuda``: the first GPU, or ValueError when none is visible.
    """
    if setting not in SETTINGS:
        raise ValueError(f"execution.device {setting!r} is unknown; choose one of {SETTINGS}")
    if setting == "cpu":
        return None
    import torch

    if setting == "auto" and not torch.cuda.is_available():
        return None
    if not torch.cuda.is_available():
        raise ValueError("execution.device is 'cuda' but no GPU is visible")
    return torch_device("cuda")
