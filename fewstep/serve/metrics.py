"""Prometheus metrics of one server (its own registry, so several apps in one process stay apart)."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)
BATCH = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.queue_requests = Gauge("fewstep_queue_requests", "Requests waiting for the engine", registry=r)
        self.queue_images = Gauge("fewstep_queue_images", "Images waiting for the engine", registry=r)
        self.batch_images = Histogram("fewstep_batch_images", "Images per engine call (UNet batch)", buckets=BATCH,
                                      registry=r)
        self.batch_seconds = Histogram("fewstep_batch_seconds", "Engine time per batch", buckets=LATENCY,
                                       registry=r)
        self.queue_seconds = Histogram("fewstep_queue_wait_seconds", "Arrival to the start of a request's batch",
                                       buckets=LATENCY, registry=r)
        self.request_seconds = Histogram("fewstep_request_seconds", "Arrival to response of generation requests",
                                         ["api"], buckets=LATENCY, registry=r)
        self.images = Counter("fewstep_images", "Images generated", registry=r)
        self.unet_steps = Counter("fewstep_unet_steps", "Denoising steps run (one per batch and step)", registry=r)
        self.requests = Counter("fewstep_http_requests", "HTTP requests by route and status", ["route", "code"],
                                registry=r)
        self.refused = Counter("fewstep_refused_requests", "Generation requests refused or dropped, by reason",
                               ["reason"], registry=r)
        self.cancelled_batches = Counter("fewstep_cancelled_batches", "Batches stopped because every client left",
                                         registry=r)
        self.adapter_switches = Counter("fewstep_adapter_switches", "Changes of the fused LoRA set", registry=r)

    def watch(self, batcher):
        self.queue_requests.set_function(batcher.queued_requests)
        self.queue_images.set_function(batcher.queued_images)

    def render(self):
        return generate_latest(self.registry)
