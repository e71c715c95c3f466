"""The config loader: defaults, presets, overrides, type coercion and errors that name key and file."""
import dataclasses
import importlib
import inspect
import textwrap
from pathlib import Path

import pytest

from dalle2.core.config import (
    ClipModelConfig,
    Config,
    ConfigError,
    DecoderModelConfig,
    DiffusionConfig,
    PriorModelConfig,
    _resolve_key,
    config_from_dict,
    describe_options,
    load_config,
    save_config,
)


def test_default_preset_is_shapes32_and_floats_are_floats():
    cfg = load_config()
    assert cfg.preset == "shapes32"
    # written 8e-4 in YAML: a string to PyYAML
    assert isinstance(cfg.clip.train.lr, float) and cfg.clip.train.lr == 8e-4
    assert cfg.prior.diffusion.objective == "x0"


def test_every_preset_loads():
    for preset in ("tiny", "shapes32", "objects", "positions", "shapes64", "cifar10"):
        assert load_config(preset=preset).preset == preset


def test_overrides_and_shorthand():
    cfg = load_config(preset="tiny",
                      overrides=["clip.lr=3e-4", "decoder.model.channel_mult=[1, 2, 4]", "data.flip=false"])
    assert cfg.clip.train.lr == pytest.approx(3e-4)
    assert cfg.decoder.model.channel_mult == [1, 2, 4]
    assert cfg.data.flip is False
    assert cfg.data.root == "data/shapes_tiny"  # from the preset


@pytest.mark.parametrize("override, words", [
    ("clip.train.foo=1", ["unknown key", "clip.train.foo"]),
    ("clip.train.lr=fast", ["clip.train.lr", "expected a number"]),
    ("clip.train.steps=1.5", ["clip.train.steps", "integer"]),
    ("data.dataset=imagenet", ["data.dataset", "not one of"]),
    ("clip.train.lr=-1", ["clip.train.lr", "minimum"]),
    ("data.flip=maybe", ["data.flip", "true or false"]),
    ("lr=1", ["unknown key"]),
    ("clip.lr", ["KEY=VALUE"]),
])
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    for w in words:
        assert w in str(e.value)


def test_shorthand_resolution():
    assert load_config(overrides=["decoder.objective=eps"]).decoder.diffusion.objective == "eps"
    tree = {"stage": {"model": {"dropout": 0.0}, "train": {"dropout": 0.1, "lr": 1.0}}}
    assert _resolve_key("stage.lr", tree, "--set") == ["stage", "train", "lr"]
    with pytest.raises(ConfigError, match="ambiguous"):
        _resolve_key("stage.dropout", tree, "--set")


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "cfg.yml"
    bad.write_text(textwrap.dedent("""
        data: {image_size: 32}
        clip: {model: {embed_dim: 64, wings: 2}}
    """))
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert str(bad) in str(e.value) and "clip.model.wings" in str(e.value)
    bad.write_text("data: {n_train: many}\n")
    with pytest.raises(ConfigError, match=r"cfg.yml: data.n_train: expected an integer"):
        load_config(bad)
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yml")
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(preset="huge")


def test_round_trip_through_dict_and_yaml(tmp_path):
    cfg = load_config(preset="tiny")
    assert config_from_dict(cfg.to_dict(), "ckpt") == cfg
    save_config(cfg, tmp_path / "run" / "config.yml")
    assert load_config(tmp_path / "run" / "config.yml", preset="shapes32") .clip == cfg.clip
    with pytest.raises(ConfigError, match="unknown key 'clip.model.old'"):
        d = cfg.to_dict()
        d["clip"]["model"]["old"] = 1
        config_from_dict(d, "ckpt")


def test_readme_option_table_shows_what_runs():
    """The README's "All options" table is describe_options(): the shapes32 values of model_config.yml
    (what runs when no preset is chosen). Regenerate it when they change."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert describe_options() in readme
    assert "| `decoder.train.ema_decay` | `0.999` |" in describe_options()


def test_the_top_level_config_is_the_packaged_one():
    """model_config.yml at the top of the repo (where people look) and dalle2/model_config.yml (what
    every install loads, DEFAULT_CONFIG) are one file in two places: an edit to only one would show
    people values that do not run."""
    repo = Path(__file__).resolve().parent.parent
    assert (repo / "model_config.yml").read_bytes() == (repo / "dalle2" / "model_config.yml").read_bytes(), \
        "model_config.yml and dalle2/model_config.yml differ: copy the edited one over the other"


def test_dataclass_defaults_are_the_yaml_top_level():
    """One set of defaults: a --config file that leaves a key out gets the value model_config.yml shows."""
    assert Config().to_dict() == load_config().to_dict()


def _fields(cls):
    return {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
            for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("build, cls", [
    ("clip.model:CLIP", ClipModelConfig),
    ("dalle2.prior.model:PriorNetwork", PriorModelConfig),
    ("dalle2.decoder.model:UNet", DecoderModelConfig),
    ("dalle2.diffusion:GaussianDiffusion", DiffusionConfig),
])
def test_constructor_defaults_are_the_config_defaults(build, cls):
    """A model built in a notebook without a config gets the config's sizes (no UNet(channels=128) against
    64 in the config): every constructor argument named like a config field defaults to that field."""
    module, name = build.split(":")
    params = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    defaults = _fields(cls)
    shared = [k for k in defaults if k in params]
    assert shared, f"{name} shares no argument with {cls.__name__}"
    for key in shared:
        default = params[key].default
        assert default is not inspect.Parameter.empty, f"{name}({key}) has no default"
        assert (list(default) if isinstance(default, tuple) else default) == defaults[key], f"{name}({key})"


@pytest.mark.parametrize("field, value", [
    ("attention_resolutions", [4]),
    ("head_channels", 48),
    ("text_heads", 3),
    ("channel_mult", [1, 2, 2, 2, 2, 2, 2]),
])
def test_unet_and_config_refuse_bad_sizes_in_the_same_words(field, value):
    """The UNet (buildable without a config) and the config loader apply one rule with one message."""
    from dalle2.decoder.model import UNet
    with pytest.raises(ConfigError) as from_config:
        load_config(overrides=[f"decoder.model.{field}={value}"])
    kw = dict(image_size=32, embed_dim=16, vocab_size=50, context_length=16, clip_text_width=32, **{field: value})
    with pytest.raises(ValueError) as from_unet:
        UNet(**kw)
    tail = str(from_config.value).split(f"decoder.model.{field}: ", 1)[1]
    assert str(from_unet.value) == f"UNet: decoder.model.{field}: {tail}"


@pytest.mark.parametrize("bad", [dict(channels=0), dict(dropout=1.5), dict(text_encoder="bert"),
                                 dict(channel_mult=[1, "x"])])
def test_unet_arguments_get_the_configs_type_and_range_checks(bad):
    from dalle2.decoder.model import UNet
    key = next(iter(bad))
    with pytest.raises(ConfigError, match=f"UNet: decoder.model.{key}"):
        UNet(image_size=32, embed_dim=16, vocab_size=50, context_length=16, clip_text_width=32, **bad)


def test_every_option_is_documented():
    table = describe_options()
    def walk(obj, prefix):
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                yield from walk(v, f"{prefix}{f.name}.")
            elif f.name != "preset":
                yield f"{prefix}{f.name}"
    for key in walk(Config(), ""):
        assert f"`{key}`" in table, key


@pytest.mark.parametrize("override, key", [
    ("decoder.model.attention_resolutions=[4]", "decoder.model.attention_resolutions"),
    ("clip.model.patch_size=5", "clip.model.patch_size"),
    ("prior.model.heads=7", "prior.model.heads"),
    ("decoder.model.head_channels=48", "decoder.model.head_channels"),
])
def test_inconsistent_sizes_fail_at_load_time(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(overrides=[override])
