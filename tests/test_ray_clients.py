"""The OpenAI SDK tests of the single server (tests/test_clients_openai.py), unchanged, against the Ray app: one
replica on a local Ray cluster with the same settings (marked `ray`)."""

import pytest

pytest.importorskip("ray")

from tests.test_clients_openai import *  # noqa: F401,F403,E402 - the same tests; only `served` differs
from tests.test_clients_openai import KEY, ORIGIN  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from safetensors.torch import save_file

    from tests.support.loras import random_lora
    from tests.support.ray import RayServed, deploy
    from tests.support.serve import default_engine

    root = tmp_path_factory.mktemp("sdk-loras")
    save_file(random_lora(default_engine().c.unet, seed=3, scale=0.1), str(root / "style.safetensors"))
    config = {"lora_dir": str(root), "max_wait": 0.0, "api_key": KEY, "cors_origins": (ORIGIN,)}
    # one replica: the stream test reads the engine's step counter from /metrics, which one replica answers
    return RayServed(deploy(config, replicas=1), key=KEY)
