"""One command, one grammar: `trainer` trains; `trainer compare`, `evaluate` and `predict` read the store.

Every argument of every command is a Hydra override (`key=value`, `+key=value`, `~key`), parsed by Hydra's own
`OverridesParser`, so quoting, lists and nulls mean what they mean in training. A command's keys are the fields
of its options dataclass (name, type, default; help and choices in the field's metadata): `--help` lists them
from there, and a key or value outside them is one `error:` line naming the key and what is valid. Every user
error of every command is a `TrainerError`, printed by `print_error`.

This module imports the standard library and trainer.config; Hydra's parser, rich and MLflow only when used.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from trainer.config import TrainerError, first_line

COMMANDS = {
    "compare": "trainer.compare",
    "evaluate": "trainer.evaluate",
    "predict": "trainer.predict",
    "export": "trainer.export",
}  # argv[1] -> the module whose main runs
TRAINING = {"lr-find": "lr_find=true"}  # commands that are training with one override more (trainer/lr_find.py)
Options = TypeVar("Options")


def main(argv: Sequence[str]) -> int | None:
    """`trainer <command> key=value ...`: the command's exit status; None when argv[0] names no command (training)."""
    if not argv or argv[0] not in COMMANDS:
        return None
    import importlib

    return importlib.import_module(COMMANDS[argv[0]]).main(list(argv[1:]))


def training_argv(argv: Sequence[str]) -> list[str]:
    """`trainer lr-find model=mlp ...` is `trainer model=mlp ... lr_find=true`: Hydra's command line, as training's."""
    argv = list(argv)
    return [*argv[1:], TRAINING[argv[0]]] if argv and argv[0] in TRAINING else argv


def plain_when_piped() -> None:
    """Output that goes to a pipe or a log stays plain. Optuna logs through colorlog, whose formatter has no
    stream to ask isatty() and so colours every line; colorlog honours NO_COLOR (as does rich). Set once, at
    the CLI's start and only when stderr is not a terminal; inherited by a launcher's job processes."""
    if not sys.stderr.isatty():
        os.environ.setdefault("NO_COLOR", "1")


@functools.cache
def notice_console() -> Any:
    """The trainer's notices on stderr (summary, resume, signals) and its progress bar: one console for all.
    soft_wrap: a notice stays one line in a piped log (rich folded the summary's `mlflow ui` hint at 80 columns)."""
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)


def print_error(error: BaseException | str) -> int:
    """The one way a user error reaches the user: `error: <one line>` on stderr; returns the exit status, 1."""
    from trainer.secrets import redact

    print(f"error: {redact(error if isinstance(error, str) else first_line(error))}", file=sys.stderr)
    return 1


def plain_console() -> Any:
    """A rich Console for stdout tables: no markup (a cell's `data.target=[target]` is text, not a style tag
    that rich would swallow) and, when piped, no width limit (rich folds every line at 80 columns)."""
    from rich.console import Console

    console = Console(markup=False, highlight=False)
    return console if console.is_terminal else Console(markup=False, highlight=False, width=100_000)


def run(command: Callable[[], Any]) -> int:
    """Run a command's body: 0, or 1 after one `error:` line for a user error or an MLflow refusal."""
    from mlflow.exceptions import MlflowException

    try:
        command()
    except (TrainerError, MlflowException) as e:
        return print_error(e)
    return 0


# --- parsing -----------------------------------------------------------------------------------
def key(default: Any, help: str, choices: tuple[str, ...] = ()) -> Any:
    """A field of a command's options: its default (immutable: None, a bool, a str, a tuple) and its --help."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def wants_help(argv: Sequence[str]) -> bool:
    return bool({"-h", "--help"} & set(argv))


def usage(command: str, options: type, summary: str, rest: str = "") -> str:
    """`trainer <command> --help`: one line per key, its default and what it does, from the dataclass."""
    lines = [f"usage: trainer {command} [key=value ...]{' ' + rest if rest else ''}", "", summary, "", "keys:"]
    for f in dataclasses.fields(options):
        default = "" if f.default is dataclasses.MISSING else f" (default: {_show(f.default)})"
        choices = f.metadata.get("choices")
        valid = f" {' | '.join(choices)}" if choices else ""
        lines.append(f"  {f.name + '=':<18}{f.metadata.get('help', '')}{valid}{default}")
    lines += ["", "Values follow Hydra's override grammar, as in training: quote a value with spaces or '=',",
              "  e.g. 'run_name=\"optimizer=adam optimizer.lr=0.01\"'."]  # fmt: skip
    return "\n".join(lines)


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return f"[{','.join(value)}]"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def parse(command: str, argv: Sequence[str], options: type[Options], rest: bool = False) -> tuple[Options, list[str]]:
    """`options` with each `key=value` of argv applied, and (with `rest`) the other overrides as given, in
    order: evaluate applies those to the run's config. Without `rest` any other key is an error."""
    keys = {f.name: f for f in dataclasses.fields(options)}
    values: dict[str, Any] = {}
    others: list[str] = []
    for arg in argv:
        override = parse_override(command, arg, keys)
        key = override.key_or_group
        if key in keys and override.type.name == "CHANGE":
            values[key] = _convert(command, override, keys[key], typing.get_type_hints(options)[key])
        elif rest:
            others.append(arg)
        else:
            raise TrainerError(f"{override.get_key_element()}: no such key for trainer {command}; valid: "
                               f"{', '.join(k + '=' for k in keys)} (trainer {command} --help)")  # fmt: skip
    return options(**values), others


def parse_override(command: str, arg: str, keys: dict[str, dataclasses.Field] | None = None) -> Any:
    """One argument as Hydra's parser reads it; an old-style `--flag`, a sweep or a package is one error line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    if arg.startswith("-"):
        raise TrainerError(_flag_hint(command, arg, keys or {}))
    try:
        [override] = OverridesParser.create().parse_overrides([arg])
    except HydraException as e:
        reason = "; ".join(ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith("See "))
        raise TrainerError(f"{arg!r} is not key=value in Hydra's override grammar ({reason}); quote a value "
                           f"holding spaces or '=': 'key=\"a b\"'") from None  # fmt: skip
    if override.is_sweep_override():
        raise TrainerError(f"{arg!r}: trainer {command} takes one value per key, not a sweep")
    if override.package is not None:
        raise TrainerError(f"{arg!r}: trainer {command} takes no @package")
    return override


def _flag_hint(command: str, arg: str, keys: dict[str, dataclasses.Field]) -> str:
    """The flags of the argparse CLI this replaces, pointed at their key=value spelling."""
    name = arg.lstrip("-").partition("=")[0].replace("-", "_")
    if name == "json" and "json" in keys.get("format", dataclasses.field()).metadata.get("choices", ()):
        return f"unknown option {arg!r}: trainer {command} takes key=value; use format=json"
    if name in keys:
        example = f"{name}=true" if keys[name].type in ("bool", bool) else f"{name}=..."
        return f"unknown option {arg!r}: trainer {command} takes key=value; use {example}"
    return f"unknown option {arg!r}: trainer {command} takes key=value (trainer {command} --help)"


def _convert(command: str, override: Any, key: dataclasses.Field, hint: Any) -> Any:
    """The parsed value as the field's type: str (a number keeps its spelling: a run id may be 12e45),
    bool, float, tuple[str, ...] (a list; one name is a list of one), each None where the type allows it."""
    value, name = override.value(), key.name
    optional = isinstance(hint, types.UnionType)  # `str | None`: the only union the options use
    allows_none = optional and type(None) in typing.get_args(hint)
    base = next(t for t in typing.get_args(hint) if t is not type(None)) if optional else hint
    if value is None and allows_none:
        return None
    if base is bool and isinstance(value, bool):
        return value
    if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if base is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        text = value if isinstance(value, str) else override.get_value_string().strip()
        choices = key.metadata.get("choices")
        if not choices or text in choices:
            return text
    if typing.get_origin(base) is tuple:
        names = value if isinstance(value, list) else [value]
        if all(isinstance(n, str) and n for n in names):
            return tuple(names)
    raise TrainerError(f"{name}={override.get_value_string()!s} is invalid: expected {_expected(key, base)}")


def _expected(key: dataclasses.Field, base: Any) -> str:
    if choices := key.metadata.get("choices"):
        return " | ".join(choices)
    if base is bool:
        return "true | false"
    if base is float:
        return "a number"
    if base is int:
        return "a whole number"
    if typing.get_origin(base) is tuple:
        return f"a list of names, e.g. {key.name}=[my_pkg.my_data,my_pkg.*]"
    return "a string"


def one_model(command: str, run_id: str | None, run_name: str | None, model: str | None,
              directory: bool = False) -> None:  # fmt: skip
    """The commands that read a logged model (evaluate, predict, export) take exactly one of its three names."""
    picked = [
        f"{key}={value}" for key, value in (("run_id", run_id), ("run_name", run_name), ("model", model)) if value
    ]
    if len(picked) > 1:
        raise TrainerError(f"{' and '.join(picked)}: the model is already picked by one; give one")
    if not picked:
        where = "models:/<name>/<version>" + (" | <directory>" if directory else "")
        raise TrainerError(f"say which model: run_id=<id>, run_name=<name> or model={where} (trainer {command} --help)")


def default_experiment() -> str:
    """`tracking.experiment` as training has it: the value in conf/tracking/default.yaml, its one home."""
    from omegaconf import OmegaConf

    from trainer.config import conf_dir

    return str(OmegaConf.load(conf_dir() / "tracking" / "default.yaml").experiment)


def main_of(command: str, options: type[Options], summary: str, body: Callable[[Options, list[str]], Any],
            argv: Sequence[str] | None, rest: str = "") -> int:  # fmt: skip
    """A command's `main`: --help, else parse and run `body(options, other overrides)`; its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if wants_help(argv):
        print(usage(command, options, summary, rest))
        return 0
    try:
        opts, others = parse(command, argv, options, rest=bool(rest))
    except TrainerError as e:
        return print_error(e)
    return run(lambda: body(opts, others))
