"""
nanoGPT-style configuration with types: the training script's config dataclass holds the defaults, a
python config file is exec'd over them, then `--key=value` / `--key value` overrides from the command
line; the result is one frozen instance with attribute access (`cfg.learning_rate`).

    python train_sft.py configs/sft_demo_cpu.py --max_iters=10 --compile=False --block_size 1024
    cfg = configure(TrainConfig, sys.argv[1:])

Unlike nanoGPT's exec'd configurator, every value is checked against the field's declared type: an
unknown key (in the file or on the command line) is an error that names it and suggests the closest
valid key, and a value must be of the field's type (an int is accepted for a float; `None` only where
the field allows it). The dataclass validates combinations itself (its __post_init__).
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import os
import re
import types
import typing

_TRUE = {'true', '1', 'yes'}
_FALSE = {'false', '0', 'no'}


class ConfigError(ValueError):
    pass


def _closest(key: str, valid) -> str:
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ''


def _unknown(key: str, valid, where: str) -> ConfigError:
    return ConfigError(f"{where}: unknown config key '{key}'{_closest(key, valid)}")


def field_types(cls) -> dict[str, tuple[type, bool]]:
    """name -> (base type, None allowed) for every field of the dataclass."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        tp, optional = hints[f.name], False
        if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            optional = len(args) < len(typing.get_args(tp))
            if len(args) != 1:
                raise TypeError(f'{cls.__name__}.{f.name}: one type (or that type | None) per key')
            tp = args[0]
        out[f.name] = (typing.get_origin(tp) or tp, optional)
    return out


def check_value(key: str, value, tp: type, optional: bool, where: str):
    """value, converted int -> float where the field is a float; ConfigError if of another type."""
    if value is None and optional:
        return None
    if tp is float and type(value) is int:
        return float(value)
    if tp in (list, tuple) and type(value) in (list, tuple):
        return tp(value)
    if type(value) is not tp:
        want = tp.__name__ + (' or None' if optional else '')
        raise ConfigError(f"{where}: expected {want}, got {type(value).__name__}")
    return value


def parse_value(key: str, text: str, tp: type, optional: bool):
    """Turn the command-line string `text` into a value of the field's type."""
    where = f'--{key}={text}'
    if optional and text.strip() == 'None':
        return None
    if tp is str:
        return text
    if tp is bool:
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"{where}: expected a bool (True/False/true/false/1/0)")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ConfigError(f"{where}: expected {tp.__name__}, "
                          f"got a value that does not parse as one") from None
    return check_value(key, value, tp, optional, where)


def apply_config_file(path: str, config: dict, typed: dict) -> dict:
    """exec the config file with the current values visible; return only the keys it set."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding='utf-8') as f:
            source = f.read()
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a python config file (binary: a checkpoint or data file?)") from None
    scope = dict(config)
    try:
        exec(compile(source, path, 'exec'), scope)
    except Exception as e:  # a config file is user input: report where it broke
        raise ConfigError(f"{path}: error while running config file: {type(e).__name__}: {e}") from e
    updates = {}
    for key, value in scope.items():
        if key.startswith('_') or key == '__builtins__':
            continue
        if key not in config:
            if callable(value) or type(value).__name__ == 'module':
                continue  # helpers / imports used inside the file
            raise _unknown(key, config, path)
        if value is not config[key]:
            updates[key] = check_value(key, value, *typed[key], f"{path}: {key} = {value!r}")
    return updates


def resolve(cls, argv: list[str]) -> tuple[dict, list[str]]:
    """-> (values: defaults <- config files (positional) <- --key=value overrides, the files read)."""
    typed = field_types(cls)
    config = {f.name: f.default for f in dataclasses.fields(cls)}
    files = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith('--'):
            config.update(apply_config_file(arg, config, typed))
            files.append(arg)
            i += 1
            continue
        body = arg[2:]
        if '=' in body:
            key, text = body.split('=', 1)
            i += 1
        else:
            key = body
            if i + 1 >= len(argv) or (argv[i + 1].startswith('--') and not _is_number(argv[i + 1])):
                raise ConfigError(f"--{key}: missing value (use --{key}=VALUE)")
            text = argv[i + 1]
            i += 2
        key = key.replace('-', '_')
        if key not in typed:
            raise _unknown(key, typed, 'command line')
        config[key] = parse_value(key, text, *typed[key])
    return config, files


def configure(cls, argv: list[str]):
    """The resolved config as a (frozen) instance of the dataclass `cls`."""
    values, _ = resolve(cls, argv)
    return cls(**values)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def help_text(cls, argv: list[str], usage: str) -> str:
    """Every key with its value after the config files and overrides in argv, and the comment that
    documents it in the dataclass source (a `# section` line starts a group)."""
    argv = [a for a in argv if a not in ('-h', '--help')]
    values, files = resolve(cls, argv)
    docs, sections = _field_comments(cls)
    lines = [usage, f"values after {', '.join(files)} and the overrides given:" if files
             else 'defaults (a config file and --key=value overrides change them):']
    for name, value in values.items():
        if name in sections:
            lines.append(f'\n  # {sections[name]}')
        text = f'  --{name}={value!r}'
        lines.append(f'{text:<44} {docs[name]}'.rstrip() if docs.get(name) else text)
    return '\n'.join(lines)


def _field_comments(cls) -> tuple[dict[str, str], dict[str, str]]:
    """From the class source: field -> its trailing comment (continued by deeper-indented comment
    lines below it), field -> the section comment (`    # ...` on a line of its own) above it."""
    names = {f.name for f in dataclasses.fields(cls)}
    docs, sections, section, last = {}, {}, None, None
    for line in inspect.getsource(cls).splitlines():
        field = re.match(r'    (\w+)\s*:[^=]*=.*?(?:#\s?(.*))?$', line)
        if field and field.group(1) in names:
            last = field.group(1)
            docs[last] = (field.group(2) or '').strip()
            if section:
                sections[last], section = section, None
        elif (m := re.match(r'    #\s?(.*)$', line)):
            section, last = m.group(1).strip(), None
        elif (m := re.match(r'\s{5,}#\s?(.*)$', line)) and last:
            docs[last] = f'{docs[last]} {m.group(1).strip()}'.strip()
    return docs, sections
