"""What a user hands `run_downstream.py`, checked before s3prl touches it.

s3prl reads `-e`/`-i` with a bare `torch.load`, `-c` with a bare `open`, parses `-o` by splitting on `=` and
`eval`-ing behind a bare `except`, and reads its `runner:` keys one by one mid-training, so a typo ends in a
traceback or a hang long after the start. Here every such input is checked once, up front, and a problem is one
line naming the file or key (a `UserError`, which the launcher prints and exits 2 on).
"""

from __future__ import annotations

import argparse
import ast
import inspect
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import yaml

from adaltm_core.errors import UserError
from adaltm_core.safe_load import torch_load
from adaltm_core.settings import parse
from adaltm_s3prl import precision

STEP = {"min": 1}


def known_arguments(argv: list[str]) -> argparse.Namespace:
    """The s3prl flags the plugin looks at, without failing on the others (s3prl parses those itself)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flags, dest in ((("-m", "--mode"), "mode"), (("-c", "--config"), "config"),
                        (("-d", "--downstream"), "downstream"), (("-e", "--past_exp"), "past_exp"),
                        (("-i", "--init_ckpt"), "init_ckpt"), (("-o", "--override"), "override"),
                        (("-p", "--expdir"), "expdir"), (("-u", "--upstream"), "upstream"),
                        (("-g", "--upstream_model_config"), "upstream_model_config"),
                        (("-k", "--upstream_ckpt"), "upstream_ckpt"),
                        (("--device",), "device"), (("--backend",), "backend"),
                        (("--local_rank",), "local_rank")):
        parser.add_argument(*flags, dest=dest)
    parser.add_argument("-f", "--upstream_trainable", action="store_true")
    parser.add_argument("-h", "--help", action="store_true")
    return parser.parse_known_args(argv)[0]


def check_command_line(argv: list[str], env: Mapping[str, str]) -> list[str]:
    """Every file, directory and override on the command line, before s3prl reads any of them; returns notices."""
    known = known_arguments(argv)
    notices: list[str] = []
    if known.help:
        return notices
    if known.past_exp:
        states = check_states_file(known.past_exp, "-e")
        if known.mode == "train":
            check_resume_world(states, known.past_exp, known.local_rank is not None, int(env.get("WORLD_SIZE", 1)))
        notices.append(resume_directory(states, known))
    if known.init_ckpt:
        check_states_file(known.init_ckpt, "-i")
    if known.config and not known.past_exp:
        check_yaml(known.config, "-c")
    if known.override and known.override.lower() != "none":
        check_overrides(known.override)
    if known.expdir:
        check_output_directory(known.expdir)
    return notices


def asked_expdir(known: argparse.Namespace) -> str | None:
    """Where the user asked a `-e` run to write: `-p`, or `-o args.expdir=...` (s3prl itself applies only the
    latter on a resume; the launcher applies `-p` too, `registration._resume_where_asked`)."""
    if known.expdir:
        return known.expdir
    for option in (known.override or "").split(",,"):
        key, sep, value = option.partition("=")
        if sep and key.strip() == "args.expdir":
            return value.strip()
    return None


def resume_directory(states: dict, known: argparse.Namespace) -> str:
    """s3prl writes a `-e` run into the directory recorded in the checkpoint, wherever the checkpoint now is: a
    copied run overwrote the original's `dev-best.ckpt`. A checkpoint moved from its directory needs `-p`."""
    target = Path(known.past_exp)
    here = target if target.is_dir() else target.parent
    asked = asked_expdir(known)
    if asked:
        return f"-e: this run writes to {asked} (as asked)"
    saved = getattr(states["Args"], "expdir", None)
    if saved is None:
        return f"-e: this run writes to {here}"
    if Path(saved).resolve() != here.resolve():
        raise UserError(f"{target}: -e: this checkpoint was saved by the run in {saved}, and s3prl would write "
                        f"into that directory (its checkpoints and metrics), not into {here}; pass -p DIR to "
                        f"choose where this run writes (e.g. -p {here})")
    return f"-e: this run writes to {saved} (the run's own directory)"


@dataclass
class RunnerSettings:
    """The `runner:` keys s3prl 0.4.18 reads (`downstream/runner.py`); other keys are left to s3prl."""
    total_steps: int = field(metadata=STEP)
    gradient_clipping: float = field(metadata={"gt": 0})
    log_step: int = field(metadata=STEP)
    eval_step: int = field(metadata=STEP)
    save_step: int = field(metadata=STEP)
    max_keep: int = field(metadata=STEP)
    eval_dataloaders: list[str] = field(default_factory=list)
    gradient_accumulate_steps: int = field(default=1, metadata=STEP)
    fp16: bool = False
    train_dataloader: str = "train"
    # the plugin's: bf16 | fp16 | fp32, or auto (bf16 on a GPU with native bf16, else fp32); adaltm_s3prl.precision
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"


def check_states_file(path: str, flag: str) -> dict:
    """`-e` / `-i`: a readable `states-*.ckpt` of s3prl's runner (or, for `-e`, a directory holding some)."""
    target = Path(path)
    if target.is_dir():
        states = sorted(target.glob("states-*.ckpt"))
        if not states:
            raise UserError(f"{target}: {flag}: no states-*.ckpt in this directory")
        target = max(states, key=lambda p: int(p.stem.split("-")[-1]) if p.stem.split("-")[-1].isdigit() else -1)
    if not target.exists():
        raise UserError(f"{target}: {flag}: no such file or directory")
    if target.stat().st_size == 0:
        raise UserError(f"{target}: {flag}: empty file")
    states = torch_load(target, mmap=True)  # s3prl loads it again: do not read a 1.3 GB file twice
    missing = [k for k in ("Args", "Config") if not isinstance(states, dict) or k not in states]
    if missing:
        raise UserError(f"{target}: {flag}: not a states checkpoint of run_downstream.py (no {', '.join(missing)})")
    return states


def check_resume_world(states: dict, path: str, distributed: bool, world_size: int) -> None:
    """s3prl asserts that a resumed training runs with the DDP setting and world size it was saved with."""
    saved_ddp = getattr(states["Args"], "local_rank", None) is not None
    if saved_ddp != distributed:
        how = f"torchrun --nproc_per_node {states.get('WorldSize', 'N')}" if saved_ddp else "a single process"
        raise UserError(f"{path}: -e: this training ran {'with' if saved_ddp else 'without'} DDP; resume it with "
                        f"{how}")
    if saved_ddp and states.get("WorldSize") != world_size:
        raise UserError(f"{path}: -e: saved with {states.get('WorldSize')} processes, resumed with {world_size}")


def check_overrides(text: str) -> None:
    """`-o "config.a.b=value,,args.c=value"`: each item one `=`, a key under `config.` or `args.`."""
    for option in text.split(",,"):
        key, sep, value = option.strip().partition("=")
        first = key.strip().split(".")[0]
        if not sep or "=" in value or first not in ("config", "args") or not key.strip().split(".")[-1]:
            raise UserError(f"-o: {option.strip()!r} is not KEY=VALUE with KEY under config. or args. "
                            "(several overrides are separated by ',,')")
        if first == "args" and len(key.strip().split(".")) != 2:
            raise UserError(f"-o: {key.strip()!r}: args overrides name one argument (args.NAME=VALUE)")


def yaml_overrides(argv: list[str]) -> list[str]:
    """`-o` values read the way config files are: s3prl `eval`s each value and keeps the text when that fails, so
    `key=true` arrived as the string 'true' and `key=null` as 'null'. A value Python reads as a literal is left to
    s3prl; any other value that YAML reads as something other than a string (true/false, null, [a, b]) is handed
    on as its Python spelling."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg in ("-o", "--override") and i + 1 < len(out):
            out[i + 1] = _yaml_values(out[i + 1])
        elif arg.startswith("--override="):
            out[i] = "--override=" + _yaml_values(arg[len("--override="):])
        elif arg.startswith("-o") and not arg.startswith("--") and len(arg) > 2:
            out[i] = "-o" + _yaml_values(arg[2:])
    return out


def _yaml_values(text: str) -> str:
    options = []
    for option in text.split(",,"):
        key, sep, value = option.partition("=")
        options.append(f"{key}={_yaml_value(value.strip())}" if sep and "=" not in value else option)
    return ",,".join(options)


def _yaml_value(text: str) -> str:
    try:
        ast.literal_eval(text)
        return text
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return text if isinstance(value, str) else repr(value)


def check_yaml(path: str, flag: str) -> None:
    target = Path(path)
    if not target.is_file():
        raise UserError(f"{target}: {flag}: config not found")
    try:
        data = yaml.safe_load(target.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{target}: {flag}: not UTF-8 text") from None
    except yaml.YAMLError as error:
        raise UserError(f"{target}: {flag}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{target}: {flag}: expected a mapping at the top level")


def check_output_directory(path: str) -> None:
    """`-p`: creatable and writable, checked before hours of training end in a failed save."""
    target = Path(path)
    existing = next((p for p in (target, *target.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise UserError(f"{existing}: -p: not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{existing}: -p: not writable")


def check_config(config: dict, source: str, device: str) -> None:
    """The run's config after s3prl merged `-c`, the checkpoint's and `-o`: its `runner` (its precision on
    `device` included) and `optimizer`."""
    runner = config.get("runner")
    parse(RunnerSettings, {k: v for k, v in (runner or {}).items() if k in RunnerSettings.__dataclass_fields__},
          f"{source}: runner")
    precision.resolve(runner or {}, device, source)
    optimizer = config.get("optimizer")
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("name"), str):
        raise UserError(f"{source}: optimizer.name: missing (e.g. AdamW, TorchOptim, DifferentialAdamW)")
    _check_optimizer(optimizer, f"{source}: optimizer")
    if not isinstance(config.get("downstream_expert"), dict):
        raise UserError(f"{source}: downstream_expert: missing or not a mapping")


def _check_optimizer(optimizer: dict, where: str) -> None:
    """The name resolves in s3prl's lookup, and the keys bind to the factory (or, for `TorchOptim`, to the
    torch.optim class); factories that swallow `**kwargs` (s3prl's Adam, AdamW) are left as they are."""
    import s3prl.optimizers

    options = {k: v for k, v in optimizer.items() if k != "name"}
    factory = getattr(s3prl.optimizers, f"get_{optimizer['name']}", None)
    if factory is None:
        raise UserError(f"{where}.name: no optimizer {optimizer['name']!r} in s3prl.optimizers")
    if optimizer["name"] == "TorchOptim":
        name = options.pop("torch_optim_name", None)
        target = getattr(torch.optim, name, None) if isinstance(name, str) else None
        if not isinstance(target, type):
            raise UserError(f"{where}.torch_optim_name: not a torch.optim class: {name!r}")
        _bind(target, [None], options, where)
        return
    _bind(factory, [None], {**options, "total_steps": 1}, where)


def _bind(function, args: list, options: dict, where: str) -> None:
    signature = inspect.signature(function)
    _check_values(signature, options, where)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        return
    try:
        signature.bind(*args, **options)
    except TypeError as error:
        raise UserError(f"{where}: {error}") from None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_values(signature: inspect.Signature, options: dict, where: str) -> None:
    """Each option the factory names has the type of its default (`lr=fast` failed inside torch): a number, true or
    false, or a list of numbers as long as the default tuple; a `float | None` parameter takes a number or null."""
    for name, value in options.items():
        parameter = signature.parameters.get(name)
        if parameter is None or parameter.default is inspect.Parameter.empty:
            continue
        default, annotation = parameter.default, str(parameter.annotation)
        if isinstance(default, bool):
            expected, ok = "true or false", isinstance(value, bool)
        elif _is_number(default) or (default is None and ("float" in annotation or "int" in annotation)):
            expected, ok = "a number" + (" or null" if default is None else ""), _is_number(value) or (
                default is None and value is None)
        elif isinstance(default, tuple) and all(map(_is_number, default)):
            expected = f"a list of {len(default)} numbers"
            ok = isinstance(value, (list, tuple)) and len(value) == len(default) and all(map(_is_number, value))
        else:
            continue
        if not ok:
            raise UserError(f"{where}.{name}: expected {expected}, got {value!r}{_yaml_number_hint(value)}")


def _yaml_number_hint(value) -> str:
    """PyYAML (YAML 1.1, as s3prl reads configs) takes `1e-4` for text: a float needs a dot (`1.0e-4`)."""
    try:
        float(value)
    except (TypeError, ValueError):
        return ""
    return f" (YAML reads {value} as text; write a number with a dot, e.g. {float(value)!r})" \
        if isinstance(value, str) else ""
