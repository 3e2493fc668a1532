"""devices.py: the one place that picks the device and dtype and joins a torchrun process group."""

from __future__ import annotations

import pytest
import torch

from pegasus_x import PegasusXConfig, PegasusXForConditionalGeneration
from pegasus_x.devices import check_device, check_dtype, init_distributed, local_rank, rank_and_world_size, \
    refuse_float16, resolve_device
from pegasus_x.errors import ConfigError, InputError

from conftest import sources_containing, tiny_kwargs


def _float16_message() -> str:
    with pytest.raises(ConfigError) as caught:
        refuse_float16(torch.float16)
    return str(caught.value)


def test_refuse_float16_passes_other_dtypes():
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        refuse_float16(dtype)
    assert "bfloat16" in _float16_message()


def test_every_float16_refusal_is_the_one_message(tmp_path):
    message = _float16_message()
    for name in ("fp16", "float16", torch.float16):
        with pytest.raises(ConfigError) as caught:
            check_dtype(name)
        assert str(caught.value) == message
    model = PegasusXForConditionalGeneration(PegasusXConfig(**tiny_kwargs())).eval()
    model.save_pretrained(tmp_path)
    with pytest.raises(ConfigError) as caught:
        PegasusXForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float16)
    assert str(caught.value) == message
    with pytest.raises(ConfigError) as caught:
        model.to(torch.float16).model.encoder(torch.tensor([[5, 6, 1]]))
    assert str(caught.value) == message
    # The reason is written once: no other module spells out the overflow.
    assert sources_containing("65504") == ["devices.py"]


def test_check_dtype_names_and_refusals():
    assert check_dtype("bf16") is torch.bfloat16 and check_dtype("fp32") is torch.float32
    assert check_dtype(None) is None
    with pytest.raises(ConfigError, match="unknown"):
        check_dtype("int8x")
    with pytest.raises(ConfigError, match="not supported"):
        check_dtype(torch.float64)


def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device(None) == torch.device("cpu")
        with pytest.raises(InputError, match="CUDA is not available"):
            resolve_device("cuda")
    else:  # a bare "cuda" is this process's GPU
        monkeypatch.setenv("LOCAL_RANK", "0")
        assert resolve_device("cuda") == torch.device("cuda", 0) == resolve_device(None)
    with pytest.raises(InputError, match="unknown"):
        resolve_device("gpu0")
    with pytest.raises(InputError, match="not supported"):
        check_device("meta")


def test_local_rank_reads_torchrun(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert local_rank() == 0
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert local_rank() == 3


def test_single_process_joins_no_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed("cpu") is False
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_distributed(None) is False
    assert rank_and_world_size() == (0, 1)


def test_one_module_joins_process_groups_and_picks_devices():
    assert sources_containing("init_process_group") == ["devices.py"]
    assert sources_containing("LOCAL_RANK") == ["devices.py"]
    assert sources_containing("cuda.set_device") == ["devices.py"]
