"""config.py: precedence, both flag dialects, booleans, lists, key=value, and clear errors."""
from __future__ import annotations

import dataclasses
import shlex

import pytest
import yaml

import config
from config import ConfigError, config_yaml, load_yaml, parse_config
from resgarden.base.atomic import write_text

SEED_COMMANDS = {
    "finetune": "--model=res2net50 --pretrained --opt=momentum --lr=0.001 --dataset=cifar10 --num_classes=10 "
                "--dataset_download",
    "validate_pretrained": "--model=res2net50 --dataset=imagenet --val_split=val --pretrained",
    "validate_ckpt": "--model=res2net50 --dataset=imagenet --val_split=val --ckpt_path=./ckpt/res2net50-best.ckpt",
    "models_zoo_train": "--run_distribute=0 --device_target=CPU --data_path=/path/to/imagenet/train "
                        "--output_path=/path/to/checkpoint",
    "models_zoo_eval": "--data_path=/path/to/imagenet/val --device_target=CPU "
                       "--checkpoint_file_path=/path/to/checkpoint/run/ckpt_0/",
}


def test_seed_commands_parse():
    c = parse_config(shlex.split(SEED_COMMANDS["finetune"]))
    assert (c.model, c.pretrained, c.opt, c.lr, c.dataset, c.num_classes, c.dataset_download) == \
        ("res2net50", True, "momentum", 0.001, "cifar10", 10, True)
    c = parse_config(shlex.split(SEED_COMMANDS["validate_ckpt"]))
    assert c.ckpt_path == "./ckpt/res2net50-best.ckpt" and c.val_split == "val" and not c.pretrained
    assert parse_config(shlex.split(SEED_COMMANDS["validate_pretrained"])).pretrained is True
    c = parse_config(shlex.split(SEED_COMMANDS["models_zoo_train"]))
    assert (c.distribute, c.device_target, c.data_dir, c.ckpt_save_dir) == \
        (False, "CPU", "/path/to/imagenet/train", "/path/to/checkpoint")
    c = parse_config(shlex.split(SEED_COMMANDS["models_zoo_eval"]))
    assert c.ckpt_path == "/path/to/checkpoint/run/ckpt_0/" and c.data_dir == "/path/to/imagenet/val"


def test_both_dialects_map_to_the_same_settings():
    mindcv = parse_config(["--data_dir=/d", "--ckpt_save_dir=/o", "--distribute=True", "--mode=1",
                           "--epoch_size=7", "--batch_size=16", "--val_while_train=False"])
    models_zoo = parse_config(["--data_path=/d", "--output_path=/o", "--run_distribute=1", "--mode", "1",
                               "--epochs", "7", "--batch-size", "16", "--val_while_train", "0"])
    assert vars(mindcv) == vars(models_zoo)


@pytest.mark.parametrize("flag, expected", [("--pretrained", True), ("--pretrained=False", False),
                                            ("--pretrained=1", True), ("--pretrained=no", False)])
def test_booleans_on_the_command_line(flag, expected):
    assert parse_config([flag]).pretrained is expected


def test_lists_and_key_value_overrides():
    c = parse_config(["--scale", "0.2", "1.0", "dataset=cifar10", "lr=0.5", "--mean", "0.5", "0.5", "0.5"])
    assert c.scale == [0.2, 1.0] and c.dataset == "cifar10" and c.lr == 0.5 and c.mean == [0.5] * 3


def test_precedence_defaults_yaml_cli(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: res2net50\nlr: 0.4\nbatch_size: 64\npretrained: yes\nscale: [0.3, 1.0]\n"
                      "data_path: /from/yaml\n")
    c = parse_config(["-c", str(recipe), "--lr=0.01"])
    assert c.lr == 0.01  # command line beats YAML
    assert c.batch_size == 64 and c.model == "res2net50" and c.pretrained is True  # YAML beats defaults
    assert c.scale == [0.3, 1.0] and c.data_dir == "/from/yaml"  # YAML aliases work too
    assert c.weight_decay == 1e-4  # default
    assert parse_config(["--config_path", str(recipe)]).lr == 0.4


def test_unknown_flag_and_yaml_key_name_the_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown setting '--lrate'"):
        parse_config(["--lrate=0.1"])
    with pytest.raises(ConfigError, match=r"did you mean 'batch_size'"):
        parse_config(["--batchsize=3"])
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("modle: resnet50\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown setting 'modle'; did you mean .*'model'"):
        parse_config(["-c", str(recipe)])


def test_bad_values_are_clear(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("pretrained: maybe\n")
    with pytest.raises(ConfigError, match="bad value 'maybe' for 'pretrained'"):
        load_yaml(str(recipe))
    recipe.write_text("opt: adam_typo\n")
    with pytest.raises(ConfigError, match="opt='adam_typo' is not one of"):
        load_yaml(str(recipe))
    recipe.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_yaml(str(recipe))
    with pytest.raises(ConfigError, match="config file not found"):
        parse_config(["-c", str(tmp_path / "missing.yaml")])
    with pytest.raises(SystemExit):
        parse_config(["--batch_size=many"])


def test_saved_config_round_trips(tmp_path):
    c = parse_config(["--model=resnest50", "--scale", "0.1", "1.0", "--pretrained"])
    write_text(str(tmp_path / "run" / "config.yaml"), config_yaml(c))
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"] == "resnest50" and saved["scale"] == [0.1, 1.0] and saved["pretrained"] is True
    assert parse_config(["-c", str(tmp_path / "run" / "config.yaml")]).model == "resnest50"


def _differences(built, declared, path: str) -> list[str]:
    if dataclasses.is_dataclass(built) and dataclasses.is_dataclass(declared):
        return [d for f in dataclasses.fields(built)
                for d in _differences(getattr(built, f.name), getattr(declared, f.name), f"{path}.{f.name}")]
    return [] if built == declared else [f"{path}: the settings give {built!r}, the spec declares {declared!r}"]


def test_the_specs_defaults_are_the_settings_defaults():
    """A setting's default is declared in config.py's table; a spec field's default must be that same
    value, so that a spec built directly (tests, the Python API) behaves as the command line does."""
    settings = config.parse_config([])
    jobs = {"TrainJob": config.train_job(settings), "InferenceJob": config.inference_job(settings)}
    found = []
    for name, job in jobs.items():
        for f in dataclasses.fields(job):
            value = getattr(job, f.name)
            if dataclasses.is_dataclass(value):
                declared = dataclasses.replace(type(value)(), **({"config_yaml": value.config_yaml}
                                                                  if f.name == "run" else {}))
                found += _differences(value, declared, f"{name}.{f.name}")
            elif f.default is not dataclasses.MISSING:
                found += _differences(value, f.default, f"{name}.{f.name}")
    assert not found, "\n".join(found)
