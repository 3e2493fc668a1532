"""hub.py: the one test of what a Hub id is, and the one download (huggingface_hub only when it starts)."""

from __future__ import annotations

import sys

import pytest

from conftest import assert_imports_without_torch, sources_containing
from pegasus_x.errors import CheckpointError, TokenizerError
from pegasus_x.hub import download, is_hub_id

IDS = ["google/pegasus-x-base", "some-org/some.model_v2", "a/b"]
NOT_IDS = ["./run", "../run", "run", "runs/x/y", "/abs/path", "~/model", "a/../b", "org/", "/name", "a b/c", ""]


@pytest.mark.parametrize("name", IDS)
def test_hub_ids(name):
    assert is_hub_id(name)


@pytest.mark.parametrize("name", NOT_IDS)
def test_paths_are_not_hub_ids(name):
    assert not is_hub_id(name)


@pytest.mark.parametrize("name", NOT_IDS[:5])
def test_checkpoint_and_tokenizer_agree_on_missing_paths(name):
    """A missing path that is no Hub id is reported as a missing folder by both loaders, no download tried."""
    from pegasus_x import PegasusTokenizer, PegasusXForConditionalGeneration

    with pytest.raises(CheckpointError, match="does not exist"):
        PegasusXForConditionalGeneration.from_pretrained(name)
    with pytest.raises(TokenizerError, match="does not exist"):
        PegasusTokenizer.from_pretrained(name)


def test_download_errors_name_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)      # as if not installed
    with pytest.raises(TokenizerError, match="'a/b' is not a local folder.*pip install huggingface_hub.*; or X"):
        download("a/b", ["*.json"], what="the thing", how="X", error=TokenizerError)


def test_download_failure_is_the_callers_error(monkeypatch):
    hub = pytest.importorskip("huggingface_hub")

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match="could not download 'a/b' \\(the thing\\).*network is unreachable.*; "
                                              "check the id and your network, or X"):
        download("a/b", ["*.json"], what="the thing", how="X", error=CheckpointError)


def test_one_module_downloads_and_it_is_light():
    assert sources_containing("snapshot_download") == ["hub.py"]
    assert_imports_without_torch("pegasus_x.hub")
