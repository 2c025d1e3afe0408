"""The GPU recipe's speed options (sd_tasks.training.speedups), run on the CPU: attention is SDPA, and training with
--channels-last or --compile gives the plain run's losses and LoRA weights to float tolerance; and the model FLOPs
count behind the GPU benchmark's MFU (bench/flops.py).

The compile test pays for inductor compiling a BasicTransformerBlock's forward and backward: about 30 s on 2 quiet
cores and 45 s at load 5 with a cold cache ($TORCHINDUCTOR_CACHE_DIR, by default /tmp/torchinductor_$USER), 6 s
with a warm one.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from bench.flops import count_step_flops, mfu, unet_step_flops
from sd_tasks.core import tracking
from sd_tasks.core.errors import StepError
from sd_tasks.models.loading import load_unet
from sd_tasks.training import speedups, train

STEPS = 2


@pytest.fixture(scope="module")
def config(cache, models, tmp_path_factory):
    return train.TrainConfig(cache=cache, output=str(tmp_path_factory.mktemp("speedups") / "plain"),
                             base_model=models["sdxl"], learning_rate=1e-3, max_steps=STEPS,
                             checkpointing_steps=STEPS, experiment="speedups")


def trained(config) -> tuple[list[float], dict]:
    result = train.run(config)
    losses = [m.value for m in sorted(tracking.client().get_metric_history(result["run_id"], "loss"),
                                      key=lambda m: m.step)]
    return losses, load_file(f"{config.output}/checkpoint-{STEPS}/{train.LORA_WEIGHTS}")


@pytest.fixture(scope="module")
def plain(config):
    return trained(config)


def assert_same_training(a, b, learning_rate: float = 1e-3):
    """The same losses to 1e-5 and the same LoRA. The up matrices start at zero, so they are what training changed:
    in total they must agree to 1e-3 of their size. Every single weight must agree to a tenth of the learning rate,
    not closer: Adam divides by the gradient's own size, so float noise in a near-zero gradient becomes a visible
    change in a few elements (the worst seen: 1.2e-5 in 1 of 2,300 elements with channels-last)."""
    (losses_a, weights_a), (losses_b, weights_b) = a, b
    assert len(losses_a) == len(losses_b) == STEPS
    assert losses_a == pytest.approx(losses_b, rel=1e-5)
    assert weights_a.keys() == weights_b.keys()
    up = [k for k in weights_a if k.endswith("lora.up.weight")]
    assert up and all(weights_a[k].abs().max() > 0 for k in up)  # training moved them
    change = sum((weights_a[k] - weights_b[k]).abs().sum() for k in up) / sum(weights_a[k].abs().sum() for k in up)
    assert change < 1e-3, f"the up matrices differ by {change:.2e} of their size"
    worst = max((weights_a[k] - weights_b[k]).abs().max().item() for k in weights_a)
    assert worst < learning_rate / 10, f"a weight differs by {worst:.2e}"


def test_the_comparison_tells_a_one_percent_larger_learning_rate_apart(config, plain, tmp_path):
    """Otherwise the equality tests below could not fail."""
    other = trained(replace(config, output=str(tmp_path / "lr"), learning_rate=config.learning_rate * 1.01))
    with pytest.raises(AssertionError, match="the up matrices differ"):
        assert_same_training(plain, other)


def test_channels_last_trains_like_the_plain_run(config, plain, tmp_path, capfd):
    result = trained(replace(config, output=str(tmp_path / "channels-last"), channels_last=True))
    assert "channels-last" in capfd.readouterr().err
    assert_same_training(plain, result)


def test_compile_trains_like_the_plain_run(config, plain, tmp_path, capfd):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    try:
        result = trained(replace(config, output=str(tmp_path / "compiled"), compile=True))
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    # the tiny UNet has 12 BasicTransformerBlocks, all of one shape: the first block's input needs no gradient
    # (no LoRA before it), the others' does, so two graphs
    assert "torch.compile of 12 BasicTransformerBlock" in capfd.readouterr().err
    assert graphs == 2
    assert_same_training(plain, result)


def test_attention_is_sdpa_and_is_set_where_it_was_not(models):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet = load_unet(models["sdxl"])
    assert speedups.use_sdpa(unet) == "SDPA attention in 24 layers"  # diffusers' default already
    unet.set_attn_processor(AttnProcessor())  # the classic one: (tokens x tokens) matrices in memory
    assert speedups.use_sdpa(unet) == "SDPA attention in 24 layers (was AttnProcessor)"
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())


def test_channels_last_converts_the_convolutions(models):
    unet = load_unet(models["sdxl"])
    assert speedups.apply(unet, channels_last=True) == ["SDPA attention in 24 layers", "channels-last"]
    convs = [m.weight for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
    spatial = [w for w in convs if w.shape[-1] > 1]  # a 1x1 kernel's two layouts are the same strides
    assert spatial and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
                           for w in spatial)


def test_compile_without_a_compiler_is_a_clear_error(models, monkeypatch):
    monkeypatch.setattr(speedups.shutil, "which", lambda name: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(StepError, match="needs a C\\+\\+ compiler"):
        speedups.apply(load_unet(models["sdxl"]), compile=True)


# ---- model FLOPs (bench/flops.py) --------------------------------------------------------------------------------

def test_flops_counted_from_shapes_alone_equal_a_real_step_with_explicit_attention(models):
    """The meta-device count (no weights) against a real CPU step that runs attention as plain matrix products
    (torch's counter has no formula for the CPU's fused SDPA kernel, which is why the bench counts on meta)."""
    from diffusers.models.attention_processor import AttnProcessor

    shapes_only = unet_step_flops(models["sdxl"], batch_size=1, resolution=64)
    unet = load_unet(models["sdxl"])
    train.add_lora(unet, train.TrainConfig(cache="", output="", base_model=models["sdxl"]))
    unet.set_attn_processor(AttnProcessor())
    assert count_step_flops(unet, batch_size=1, resolution=64) == shapes_only
    assert unet_step_flops(models["sdxl"], batch_size=4, resolution=64) == 4 * shapes_only
    assert 3 * shapes_only < unet_step_flops(models["sdxl"], batch_size=1, resolution=128) < 5 * shapes_only


def test_mfu():
    assert mfu(14.1e12, 0.05, 989.0) == pytest.approx(14.1 / 0.05 / 989)
    with pytest.raises(ValueError):
        mfu(1e12, 0.0, 989.0)
    with pytest.raises(ValueError):
        count_step_flops(None, batch_size=1, resolution=60)
