"""Each default has one home: the YAML option under conf/ that a user reads and overrides.

The rule, as the tests below hold it:
1. A schema (`trainer.config`, the typed node an option starts from) states no value: every field is
   MISSING, so Hydra still rejects unknown keys and wrong types while composing, and `__post_init__` holds
   the ranges, but a value lives only in the option. `_partial_` is the one exception: it is how the
   trainer calls the object (`loss(y_true, y_pred)`, the optimizer handed its schedule), not a setting.
2. No YAML option states a key whose schema has a default (conf/config.yaml and `Config` included).
3. A builder an option names (`_target_` in `trainer.*`), and `optim.Schedule` that `build_optimizer`
   feeds the schedule group, has no default for any key the option gives it: Hydra passes every key.
   `trainer.optim.Adam`/`AdamW` keep Keras' signature, defaults and `fused=None` included, so each stays a
   drop-in `keras.optimizers.Adam` (tests/test_optim.py builds them as such).
4. A resumed run whose run.json predates a trainer key takes that key from conf/trainer/default.yaml.

Before this rule 76 of the 89 keys the typed options state repeated their schema default word for word,
and the builders had 37 parameter defaults (measured by comparing `dataclasses.fields` and
`inspect.signature` with the YAML files).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from omegaconf import MISSING, OmegaConf

from conftest import compose_config
from trainer import checkpoint, optim
from trainer.config import SCHEMAS, Config, check, option, with_current_defaults

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
NOT_SETTINGS = {"_partial_"}
KERAS_DROP_INS = {"trainer.optim.Adam", "trainer.optim.AdamW"}


def _yaml_options() -> Iterator[tuple[Path, dict, type]]:
    """(file, values, schema) for every option that starts from a schema; conf/config.yaml with `Config`."""
    shared = yaml.safe_load((CONF_DIR / "data_defaults.yaml").read_text())  # what `/data_defaults@_here_` adds
    for path in sorted(CONF_DIR.rglob("*.yaml")):
        doc = yaml.safe_load(path.read_text()) or {}
        if "/data_defaults@_here_" in doc.get("defaults", []):
            doc = {**shared, **doc}
        for entry in doc.get("defaults", []):
            m = re.fullmatch(r"/schema/(\w+)/(\w+)@(\w+)", str(entry))
            schema = SCHEMAS[m.group(1)][m.group(2)] if m else Config if entry == "config_schema" else None
            if schema is not None:  # `@_here_`: the file's own keys; `@step` in a `_global_` file: its `step` node
                values = doc if not m or m.group(3) == "_here_" else doc[m.group(3)]
                yield path, {k: v for k, v in values.items() if k != "defaults"}, schema


def _schemas() -> Iterator[type]:
    """Every schema class of the groups, and the dataclasses nested in them (trainer.early_stopping)."""
    seen: list[type] = []
    todo = [s for group in SCHEMAS.values() for s in group.values()]
    while todo:
        schema = todo.pop()
        if schema not in seen:
            seen.append(schema)
            todo += [f.type for f in dataclasses.fields(schema) if dataclasses.is_dataclass(f.type)]
    yield from seen


def _has_default(f: dataclasses.Field) -> bool:
    return f.default_factory is not dataclasses.MISSING or f.default not in (dataclasses.MISSING, MISSING)


def _stated_twice(values: dict, schema: type, prefix: str = "") -> Iterator[str]:
    """Keys of `values` (an option's YAML) whose schema field has a default too, nested dataclasses included."""
    by_name = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in values.items():
        f = by_name.get(key)
        if f is None:
            continue
        if _has_default(f):
            yield f"{prefix}{key}"
        elif dataclasses.is_dataclass(f.type) and isinstance(value, dict):
            yield from _stated_twice(value, f.type, f"{prefix}{key}.")


def test_schemas_state_no_values():
    with_values = [
        f"{schema.__name__}.{f.name}"
        for schema in _schemas()
        for f in dataclasses.fields(schema)
        if _has_default(f) and f.name not in NOT_SETTINGS
    ]
    assert with_values == [], "these schema fields state a value; state it in the YAML option instead"


def test_no_yaml_option_restates_a_schema_default():
    options = list(_yaml_options())
    typed = [p for group in SCHEMAS for p in (CONF_DIR / group).glob("*.yaml")]
    assert len(options) == len(typed) + 1 == 40  # every option of a typed group, and conf/config.yaml
    twice = [f"{p.relative_to(CONF_DIR)}: {k}" for p, values, schema in options for k in _stated_twice(values, schema)]
    assert twice == []


def _builders() -> Iterator[tuple[str, object, set[str]]]:
    """(target, callable, the keys its options give it) for every built-in option's `trainer.*` target."""
    keys: dict[str, set[str]] = {}
    for _, values, _ in _yaml_options():
        target = values.get("_target_", "")
        if target.startswith("trainer.") and target not in KERAS_DROP_INS:
            keys.setdefault(target, set()).update(k for k in values if not k.startswith("_"))
    schedule_keys = {f.name for f in dataclasses.fields(SCHEMAS["schedule"]["schedule"])}
    keys["trainer.optim.Schedule"] = schedule_keys | {"lr", "total_steps"}
    for target, given in sorted(keys.items()):
        module, name = target.rsplit(".", 1)
        yield target, getattr(importlib.import_module(module), name), given


def test_builders_take_every_setting_from_the_option():
    builders = list(_builders())
    assert {t for t, _, _ in builders} >= {"trainer.data.regression", "trainer.models.MLP", "trainer.optim.Schedule"}
    with_defaults = [
        f"{target}({p.name}={p.default!r})"
        for target, builder, given in builders
        for p in inspect.signature(builder).parameters.values()
        if p.name in given and p.default is not inspect.Parameter.empty
    ]
    assert with_defaults == []
    for target, builder, given in builders:  # and the options give every parameter there is
        params = inspect.signature(builder).parameters.values()
        required = {p.name for p in params if p.default is inspect.Parameter.empty and p.kind <= p.KEYWORD_ONLY}
        from_groups = {"model", "loss", "optimizer"} if target.startswith("trainer.steps.") else set()  # train._build
        assert required <= given | {"y_true", "y_pred"} | from_groups, target


def test_the_schedule_builder_reads_exactly_the_schedule_option():
    """optim.Schedule takes every schedule key with no default of its own, and gives back what it took."""
    cfg = compose_config(["schedule=exponential"])
    schedule = optim.Schedule(0.1, total_steps=50, **OmegaConf.to_container(cfg.schedule))
    assert schedule.get_config() == {"lr": 0.1, "total_steps": 50, **option("schedule", "exponential")}
    assert float(schedule(100)) == pytest.approx(0.1 * 0.96)  # decay_steps 100, decay_rate 0.96: from the YAML
    with pytest.raises(TypeError, match="decay_rate"):
        optim.Schedule(0.1, name="exponential", total_steps=50, warmup_steps=None, decay_steps=100)


def _stored(**trainer_changes) -> tuple[dict, dict]:
    """A run.json's config as a run of today writes it, then the same with trainer keys dropped or changed."""
    plain = OmegaConf.to_container(compose_config(["trainer.max_steps=30"]))
    old = {**plain, "trainer": {**plain["trainer"], "early_stopping": dict(plain["trainer"]["early_stopping"])}}
    del old["trainer"]["max_skipped_fraction"], old["trainer"]["early_stopping"]["restore_best"]
    old["trainer"].update(trainer_changes)
    return plain, old


def test_a_resumed_run_takes_the_trainer_keys_its_run_json_predates_from_the_yaml(tmp_path):
    from trainer.train import _resumed_config

    plain, old = _stored(batch_size=7)
    yaml_trainer = option("trainer", "default")
    assert (yaml_trainer.max_skipped_fraction, yaml_trainer.early_stopping.restore_best) == (0.1, True)
    resume = checkpoint.Resume(tmp_path, "0" * 32, plain["tracking"]["uri"], OmegaConf.create(old))
    cfg = _resumed_config(resume, [], compose_config([]))
    check(cfg)
    assert cfg.trainer.max_skipped_fraction == 0.1  # what fit's skip_step bound reads: from the YAML option
    assert cfg.trainer.early_stopping.restore_best is True
    assert (cfg.trainer.batch_size, cfg.trainer.max_steps) == (7, 30)  # the run's own values win
    expected = {**plain["trainer"], "batch_size": 7}
    assert OmegaConf.to_container(cfg.trainer) == expected
    assert "per_variable_every" in cfg.tracking  # tracking keys stay as stored


def test_filling_leaves_a_complete_or_malformed_run_json_alone():
    plain, _ = _stored()
    complete = OmegaConf.create(plain)
    assert OmegaConf.to_container(with_current_defaults(complete)) == plain
    odd = OmegaConf.create({**plain, "trainer": "not a mapping"})
    assert with_current_defaults(odd).trainer == "not a mapping"  # check() refuses it later, naming the key


def test_a_run_logged_before_a_data_or_optimizer_key_existed_gets_the_options_value():
    """A run logged before `data.sample_weight`, `data.class_weight` or `optimizer.use_ema` existed: its resume and
    `trainer evaluate` take them from the option with its `_target_` (before: `data.class_weight must be set`,
    then the reader's missing argument); its own values win; your own `_target_`s stay as stored."""
    from trainer.config import with_current_defaults, with_option_defaults

    plain = OmegaConf.to_container(compose_config(["data=csv", "data.path=x.csv", "data.target=y", "optimizer=adam"]))
    old = {**plain, "data": dict(plain["data"]), "optimizer": dict(plain["optimizer"])}
    for key in ("sample_weight", "class_weight", "columns"):
        del old["data"][key]
    del old["optimizer"]["use_ema"], old["optimizer"]["ema_momentum"]
    old["optimizer"]["lr"] = 0.5
    old["loss"] = {"_target_": "my.loss", "tau": 0.9}
    for fill in (with_current_defaults, with_option_defaults):
        cfg = fill(OmegaConf.create(old))
        assert OmegaConf.to_container(cfg.data) == plain["data"]
        assert cfg.optimizer.use_ema is False and cfg.optimizer.ema_momentum == 0.99 and cfg.optimizer.lr == 0.5
        assert OmegaConf.to_container(cfg.loss) == {"_target_": "my.loss", "tau": 0.9}
