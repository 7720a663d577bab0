"""The device argument of the core: None keeps numpy, a torch device runs torch there, and a
GPU that is not visible is refused by name."""

import pytest
import torch

from saeuniv.config import ConfigError, load_config
from saeuniv.core.devices import analysis_device, torch_device
from saeuniv.pipeline import Pipeline
from saeuniv.store import Store

NO_GPU = not torch.cuda.is_available()


def test_none_is_numpy_and_names_are_torch_devices():
    assert torch_device(None) is None
    assert torch_device("cpu") == torch.device("cpu")
    assert torch_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device 'tpu0' is not a torch device"):
        torch_device("tpu0")


def test_settings_resolve_to_numpy_or_the_gpu():
    assert analysis_device("cpu") is None
    assert analysis_device("auto") == (None if NO_GPU else torch.device("cuda"))
    with pytest.raises(ValueError, match=r"execution.device 'gpu' is unknown"):
        analysis_device("gpu")


@pytest.mark.skipif(not NO_GPU, reason="checks the refusal on a machine without a GPU")
def test_a_missing_gpu_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"device 'cuda:0' was asked for but no GPU is visible"):
        torch_device("cuda:0")
    pipe = Pipeline(load_config("tiny", {"execution.device": "cuda"}), Store(tmp_path))
    with pytest.raises(ConfigError, match=r"execution.device is 'cuda' but no GPU is visible; "
                                          r"set execution.device: auto or cpu"):
        pipe.validate()
    assert not any(tmp_path.iterdir())  # nothing was built


def test_the_device_keys_what_it_computes(tmp_path, monkeypatch):
    pipe = Pipeline(load_config("tiny"), Store(tmp_path))
    assert pipe.device_key == {}  # the numpy path: the keys every store already holds
    monkeypatch.setattr(Pipeline, "device", torch.device("cpu"))
    assert Pipeline(load_config("tiny"), Store(tmp_path)).device_key == {"device": "cpu"}
