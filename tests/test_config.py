"""Configuration: flags > environment > TOML file > defaults, and errors that say how to fix them."""

from __future__ import annotations

import pytest
from zimage_server.cli import config_from_args
from zimage_server.config import ConfigError


def test_precedence_flag_over_env_over_file(tmp_path):
    toml = tmp_path / "server.toml"
    toml.write_text('max_batch_size = 6\nmax_queue_delay_ms = 25\nbatching = "step"\nwarmup_sizes = ["256x256"]\n')
    env = {"ZIMAGE_MAX_QUEUE_DELAY_MS": "40", "ZIMAGE_COMPILE": "true"}
    config = config_from_args(["--config", str(toml), "--max-batch-size", "8"], environ=env)
    assert config.scheduler.max_batch_size == 8  # flag
    assert config.scheduler.max_queue_delay_ms == 40  # env over file
    assert config.scheduler.batching == "step"  # file
    assert config.engine.compile is True
    assert config.engine.warmup_sizes == ((256, 256),)
    assert config.scheduler.max_queue_size == 64  # default


def test_metrics_bind_defaults_to_loopback_with_auth(tmp_path):
    token = tmp_path / "token"
    token.write_text("secret\n")
    assert config_from_args(["--auth-token-file", str(token)], environ={}).metrics_host == "127.0.0.1"
    assert config_from_args([], environ={}).metrics_host == "0.0.0.0"
    explicit = config_from_args(["--auth-token-file", str(token), "--metrics-host", "0.0.0.0"], environ={})
    assert explicit.metrics_host == "0.0.0.0"


def test_scheduler_settings_left_auto_take_the_device_defaults():
    """Issue 19: on a CPU request mode (step mode's settings: the fair order, a one-512²-image token budget);
    on a GPU step mode with packed forwards of every size and no budget. What a flag sets is kept."""
    cpu = config_from_args([], environ={}).scheduler.resolved("cpu")
    assert (cpu.batching, cpu.step_policy, cpu.max_tokens_per_step, cpu.mix_resolutions) == (
        "request", "fair", 1024, "measured")
    gpu = config_from_args([], environ={}).scheduler.resolved("cuda:0")
    assert (gpu.batching, gpu.step_policy, gpu.max_tokens_per_step, gpu.mix_resolutions) == ("step", "age", 0, "packed")
    argv = ["--batching", "request", "--step-policy", "interleave", "--max-tokens-per-step", "0",
            "--mix-resolutions", "never"]
    pinned = config_from_args(argv, environ={}).scheduler
    for device in ("cpu", "cuda"):
        kept = pinned.resolved(device)
        assert (kept.batching, kept.step_policy, kept.max_tokens_per_step, kept.mix_resolutions) == (
            "request", "interleave", 0, "never")
    assert config_from_args([], environ={}).scheduler.unresolved() == [
        "batching", "step_policy", "mix_resolutions", "max_tokens_per_step"]
    assert pinned.unresolved() == [] and cpu.unresolved() == []


@pytest.mark.parametrize("argv,message", [
    (["--batching", "continuous"], "--batching must be auto, request or step"),
    (["--max-batch-size", "0"], "--max-batch-size must be >= 1"),
    (["--preferred-batch-sizes", "2,16", "--max-batch-size", "8"], "--preferred-batch-sizes: 16"),
    (["--quantize", "int3"], "--quantize must be one of"),
    (["--compile", "--quantize", "int8", "--quant-backend", "quanto"], "--compile cannot be combined"),
    (["--tls-cert", "a.pem"], "--tls-cert and --tls-key must be given together"),
    (["--max-batch-size", "many"], "--max-batch-size: cannot parse"),
    (["--max-tokens-per-step=-1"], "--max-tokens-per-step must be >= 0"),
    (["--mix-resolutions", "padded"], "--mix-resolutions must be auto, measured, always, never or packed"),
    (["--step-policy", "lottery"], "--step-policy must be auto, interleave, age, fair, batch or wsjf"),
])
def test_invalid_configuration_says_how_to_fix_it(argv, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        config_from_args(argv, environ={})


def test_unknown_key_in_config_file_is_refused(tmp_path):
    toml = tmp_path / "bad.toml"
    toml.write_text("max_bach_size = 3\n")
    with pytest.raises(ConfigError, match="unknown keys max_bach_size"):
        config_from_args(["--config", str(toml)], environ={})
