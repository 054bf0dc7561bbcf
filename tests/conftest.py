import logging
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine two OpenMP threads per process can make
    each op wait for a time slice (training steps measured 100x slower): modules that run many use one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _fewstep_home(tmp_path_factory, monkeypatch):
    # the default model is built once per session into a temporary home, never into the user's cache
    monkeypatch.setenv("FEWSTEP_HOME", str(tmp_path_factory.getbasetemp() / "fewstep-home"))


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """Tiny models saved as diffusers folders, built once per session."""
    from tests.support.tiny import save_sd, save_sdxl

    root = tmp_path_factory.mktemp("models")
    made = {}

    def get(name):
        if name not in made:
            path = root / name
            if name == "sd":
                save_sd(path)
            elif name == "sd2":
                save_sd(path, v2=True)
            elif name == "sd-lcm":
                save_sd(path, time_cond_proj_dim=32)
            elif name == "sdxl":
                save_sdxl(path)
            else:
                raise KeyError(name)
            made[name] = path
        return made[name]

    logging.getLogger("fewstep").setLevel(logging.ERROR)
    return get
