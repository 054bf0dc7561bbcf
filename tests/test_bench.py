"""`fewstep bench`'s schedules (all systems at once or one at a time), --quick's defaults and the matmul-rate share."""

import json
import math

import pytest
import torch

from fewstep.cli import build_parser, main

TINY = ["--size", "32", "--systems", "fewstep,diffusers-seed", "--json", "--dtype", "fp32", "--matmul-size", "256"]


def bench(models, capsys, *flags):
    assert main(["bench", "--model", str(models("sd")), *TINY, *flags]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow  # two bench runs (~10-70 s on 2 shared cores); the default suite has the one below
def test_one_at_a_time_gives_the_alternated_rows_with_each_system_peak(models, capsys):
    together = bench(models, capsys, "--alternate", "--runs", "1", "--modes", "lcm")
    alone = bench(models, capsys, "--one-at-a-time", "--quick")  # --quick: one run, lcm only; --size 32 still wins
    assert (together["schedule"], alone["schedule"]) == ("alternated", "one-at-a-time")
    key = lambda r: (r["system"], r["mode"], r["batch"])  # noqa: E731
    assert [key(r) for r in alone["rows"]] == [key(r) for r in together["rows"]] == [
        ("fewstep", "lcm", 1), ("diffusers-seed", "lcm", 1)]
    for a, t in zip(alone["rows"], together["rows"]):
        assert set(a) == set(t) and a["size"] == t["size"] == 32
        assert len(a["runs"]) == 1 and a["unet_calls"] == t["unet_calls"] == 4  # quick: stages from the timed run
    for data, measured in ((together, False), (alone, True)):
        for r in data["rows"]:
            assert r["system_peak_measured"] is measured
            assert 2**20 < r["system_peak_rss_bytes"] <= data["peak_rss_bytes"] * 1.01
    assert alone["rows"][0]["speedup_vs"]["diffusers-seed"] > 0


def test_the_unet_share_of_the_matmul_rate_is_reported(models, capsys):
    data = bench(models, capsys, "--runs", "1", "--modes", "lcm", "--systems", "fewstep")
    assert data["matmul_rates"]["float32"] > 1e8 and data["matmul_size"] == 256
    assert set(data["matmul_rates"]) <= {"float32", "bfloat16", "float16"}
    (row,) = data["rows"]
    assert row["matmul_rate_dtype"] == "float32" and data["unet_sample_flops"] > 0
    assert 0 < row["unet_rate_fraction"] < 50 and math.isfinite(row["unet_flop_per_s"])
    # a tiny model fits: auto alternates, and the row's peak is an estimate no larger than the process's
    assert data["schedule"] == "alternated" and 0 < data["estimate_bytes"] < data["mem_available_bytes"]
    assert row["system_peak_measured"] is False
    assert 2**20 < row["system_peak_rss_bytes"] <= data["peak_rss_bytes"] * 1.01


def test_unet_flops_on_the_meta_device_equal_a_real_count(models):
    from diffusers import UNet2DConditionModel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from fewstep.bench import unet_sample_flops

    unet = UNet2DConditionModel.from_pretrained(models("sd") / "unet").eval()
    # the CPU's fused attention kernel has no FLOP formula in the counter (it would count 0); the math kernel's
    # matmuls are what the meta device counts
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        unet(torch.randn(2, unet.config.in_channels, 4, 4), 500, torch.randn(2, 77, unet.config.cross_attention_dim))
    # the meta copy counts one sample: the real batch of two is twice its work
    assert unet_sample_flops(unet, 32, xl=False) * 2 == counter.get_total_flops() > 0


def test_quick_makes_each_default_short_and_given_flags_win():
    from fewstep.bench import plan

    parse = lambda *a: build_parser().parse_args(["bench", *a])  # noqa: E731
    assert plan(parse()) == (512, 3, ["lcm", "euler"])
    assert plan(parse("--quick")) == (256, 1, ["lcm"])
    assert plan(parse("--quick", "--arch", "sdxl")) == (512, 1, ["lcm"])
    assert plan(parse("--quick", "--runs", "2", "--modes", "lcm,euler", "--size", "384")) == (384, 2, ["lcm", "euler"])
    assert not parse().one_at_a_time and parse("--one-at-a-time").one_at_a_time
