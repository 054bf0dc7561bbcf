"""One local Ray cluster per test session (127.0.0.1, 2 CPUs) and the fewstep Serve app deployed on it."""

import socket

import httpx

_state = {}


def deploy(config, replicas=2, load=None):
    """(re)deploy fewstep's Serve app with this ServeConfig dict; returns its base URL. The cluster starts once."""
    import ray
    from ray import serve

    from fewstep.serve.ray import deployments

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    if "port" not in _state:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            _state["port"] = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": _state["port"]})
    serve.run(deployments(load or {"model": None, "device": "cpu", "dtype": "fp32"}, config, replicas=replicas,
                          cpus=0.5), name="fewstep", route_prefix="/")
    return f"http://127.0.0.1:{_state['port']}"


class RayServed:
    """What the single-server tests read from a LiveServer (url, metric), for the Ray app."""

    def __init__(self, url, key=None):
        self.url = url
        self.key = key

    def metric(self, name, **labels):
        from prometheus_client.parser import text_string_to_metric_families

        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        text = httpx.get(self.url + "/metrics", headers=headers, timeout=30).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0
