"""
nanoGPT-style configuration: the training script's module-level globals are the defaults, a python
config file is exec'd over them, then `--key=value` / `--key value` overrides from the command line.

    python train_sft.py configs/sft_demo_cpu.py --max_iters=10 --compile=False --block_size 1024

Unlike nanoGPT's exec'd configurator, every value is checked: an unknown key (in the file or on the
command line) is an error that names it and suggests the closest valid key, and an override must
parse as the default's type. Use it as `globals().update(configure(defaults, sys.argv[1:]))`.
"""
from __future__ import annotations

import ast
import difflib
import os

_TRUE = {'true', '1', 'yes'}
_FALSE = {'false', '0', 'no'}


class ConfigError(ValueError):
    pass


def _closest(key: str, valid) -> str:
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ''


def _unknown(key: str, valid, where: str) -> ConfigError:
    return ConfigError(f"{where}: unknown config key '{key}'{_closest(key, valid)}")


def parse_value(key: str, text: str, default):
    """Turn the command-line string `text` into a value of the default's type."""
    expected = type(default)
    if default is None:
        # No type to go by: take a python literal if it is one, else the plain string.
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    if expected is bool:
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"--{key}={text}: expected a bool (True/False/true/false/1/0)")
    if expected is str:
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ConfigError(f"--{key}={text}: expected {expected.__name__}, "
                          f"got a value that does not parse as one") from None
    if expected is float and type(value) is int:
        value = float(value)  # --learning_rate=1 means 1.0
    if type(value) is not expected and not (expected in (list, tuple) and type(value) in (list, tuple)):
        raise ConfigError(f"--{key}={text}: expected {expected.__name__}, got {type(value).__name__}")
    if expected in (list, tuple):
        value = expected(value)
    return value


def apply_config_file(path: str, config: dict) -> dict:
    """exec the config file with the current values visible; return only the keys it set."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        source = f.read()
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
        default = config[key]
        if isinstance(default, float) and type(value) is int:
            value = float(value)
        if default is not None and value is not None and type(value) is not type(default):
            raise ConfigError(f"{path}: {key} = {value!r}: expected {type(default).__name__}, "
                              f"got {type(value).__name__}")
        updates[key] = value
    return updates


def configure(defaults: dict, argv: list[str]) -> dict:
    """Return the resolved config: defaults <- config files (positional) <- --key=value overrides."""
    config = dict(defaults)
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith('--'):
            config.update(apply_config_file(arg, config))
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
        if key not in defaults:
            raise _unknown(key, defaults, 'command line')
        config[key] = parse_value(key, text, defaults[key])
    return config


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def config_keys(namespace: dict) -> dict:
    """The configurable globals of a module: plain values defined before this call."""
    return {k: v for k, v in namespace.items()
            if not k.startswith('_') and isinstance(v, (int, float, bool, str, type(None), list, tuple))}
