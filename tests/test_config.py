"""Config: YAML == flags, every flag documented, bad values and combinations rejected before any work."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from rlhfkit import config as C
from rlhfkit.cli import STAGES
from rlhfkit.errors import ConfigError


def stage_classes():
    return [getattr(C, cls) for _, cls, _ in STAGES.values()]


@pytest.mark.parametrize("cls", stage_classes(), ids=lambda c: c.__name__)
def test_every_field_has_help_and_round_trips_through_yaml(cls):
    for name, tp, f, default in C.iter_fields(cls):
        assert f.metadata.get("help"), f"{cls.__name__}.{name} has no help text"
    cfg = cls()
    again = C.from_dict(cls, __import__("yaml").safe_load(C.to_yaml(cfg))) if _valid(cfg) else None
    if again is not None:
        assert again == cfg


def _valid(cfg):
    try:
        C.check_config(cfg)
        return True
    except ConfigError:
        return False


def test_yaml_and_flags_are_the_same_fields(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("optim:\n  lr: 3.0e-4\n  batch_size: 8\nmodel:\n  n_layer: 2\nsample_prompts: [a, b]\n")
    from_file = C.parse_config(C.PretrainConfig, ["--config", str(y)])
    from_flags = C.parse_config(C.PretrainConfig, ["--optim.lr", "3e-4", "--optim.batch_size", "8",
                                                   "--model.n_layer", "2", "--sample_prompts", "a,b"])
    assert from_file == from_flags
    assert from_file.optim.lr == 3e-4 and from_file.model.n_layer == 2 and from_file.sample_prompts == ["a", "b"]
    # Flags override the file.
    both = C.parse_config(C.PretrainConfig, ["--config", str(y), "--optim.batch_size", "4"])
    assert both.optim.batch_size == 4 and both.optim.lr == 3e-4


def test_unknown_yaml_key_names_file_line_and_suggestion(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("optim:\n  lr: 1e-3\n  lrr: 2\n")
    cfg = C.PretrainConfig()
    data, lines = C.load_yaml(y)
    with pytest.raises(ConfigError) as e:
        C.apply_mapping(cfg, data, str(y), lines)
    msg = str(e.value)
    assert f"{y}:3" in msg and "optim.lrr" in msg and "did you mean 'optim.lr'" in msg


def test_wrong_type_names_line_and_expected_type(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("model:\n  n_layer: four\n")
    data, lines = C.load_yaml(y)
    with pytest.raises(ConfigError, match=r"bad.yaml:2: model.n_layer: expected an integer, got 'four'"):
        C.apply_mapping(C.PretrainConfig(), data, str(y), lines)


def test_invalid_yaml_syntax_has_line(tmp_path):
    y = tmp_path / "broken.yaml"
    y.write_text("optim:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:\d+: not valid YAML"):
        C.load_yaml(y)


@pytest.mark.parametrize("argv, msg", [
    (["--model.d_model", "100", "--model.n_head", "3"], "model.d_model=100 is not divisible by model.n_head=3"),
    (["--optim.lr", "0"], "optim.lr=0.0 must be > 0"),
    (["--optim.warmup_steps", "10", "--optim.max_steps", "5"], "optim.warmup_steps=10 exceeds optim.max_steps=5"),
    (["--data.seq_len", "512"], "data.seq_len=512 exceeds model.max_seq_len=256"),
    (["--model.dtype", "float8"], "expected one of float32, bfloat16, float16"),
    (["--run.device", "tpu"], "run.device='tpu'"),
    (["--early_stop_patience", "2", "--log.eval_every", "0"], "needs log.eval_every > 0"),
])
def test_bad_combinations_rejected_at_parse_time(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        C.parse_config(C.PretrainConfig, argv)
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


def test_sft_requires_a_model():
    with pytest.raises(ConfigError, match="sft needs model.name_or_path"):
        C.check_config(C.SFTConfig())


def test_bool_and_list_flags():
    cfg = C.parse_config(C.PretrainConfig, ["--log.tensorboard", "false", "--run.resume"])
    assert cfg.log.tensorboard is False and cfg.run.resume is True
    with pytest.raises(SystemExit):
        C.parse_config(C.PretrainConfig, ["--log.tensorboard", "maybe"])


def test_cli_help_lists_every_flag_and_needs_no_torch():
    out = subprocess.run([sys.executable, "-c",
                          ("import sys; from rlhfkit.cli import main\n"
                           "try: main(['pretrain', '--help'])\n"
                           "except SystemExit: pass\n"
                           "print('TORCH_LOADED' if 'torch' in sys.modules else 'NO_TORCH')")],
                         capture_output=True, text=True, check=True).stdout
    assert "NO_TORCH" in out
    for name, *_ in C.iter_fields(C.PretrainConfig):
        assert f"--{name}" in out, name


def test_print_config_is_valid_yaml_of_the_effective_config(capsys):
    with pytest.raises(SystemExit) as e:
        C.parse_config(C.PretrainConfig, ["--optim.lr", "5e-4", "--print-config"])
    assert e.value.code == 0
    import yaml

    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 5e-4
    assert C.from_dict(C.PretrainConfig, printed) == dataclasses.replace(
        C.PretrainConfig(), optim=dataclasses.replace(C.PretrainConfig().optim, lr=5e-4))


def test_unknown_command_suggests(capsys):
    from rlhfkit.cli import main

    assert main(["pretrian"]) == 2
    assert "did you mean 'pretrain'" in capsys.readouterr().err


def test_nested_section_defaults_are_not_shared():
    from dataclasses import dataclass

    @dataclass
    class Outer:
        inner: C.PretrainConfig = C.section(C.PretrainConfig, "a whole stage inside another",
                                            optim=C.OptimConfig(lr=0.5))

    a, b = Outer(), Outer()
    a.inner.optim.lr = 0.1
    assert b.inner.optim.lr == 0.5 and Outer().inner.optim.lr == 0.5
