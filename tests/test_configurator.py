import dataclasses
from dataclasses import dataclass

import pytest

from configurator import ConfigError, configure, help_text


@dataclass(frozen=True)
class Config:
    # training
    max_iters: int = 100              # optimizer steps
    learning_rate: float = 6e-4       # peak learning rate
    compile: bool = True
    init_from: str = 'scratch'        # 'scratch' | 'resume' | a path:
                                      # a checkpoint or an HF dir
    # model
    block_size: int = 2048
    n_layer: int | None = None        # None: the preset's
    wandb_run_name: str | None = None
    betas: tuple = (0.9, 0.95)

    def __post_init__(self):
        if self.max_iters < 0:
            raise ConfigError(f'max_iters={self.max_iters}: must be >= 0')


def test_overrides_are_typed_by_the_fields_and_the_result_is_frozen():
    cfg = configure(Config, ['--max_iters=10', '--learning_rate=3e-4', '--compile=False',
                             '--init_from=hf:/x/y', '--block_size', '1024', '--n_layer=4'])
    assert cfg.max_iters == 10 and type(cfg.max_iters) is int
    assert cfg.learning_rate == 3e-4 and cfg.compile is False and cfg.init_from == 'hf:/x/y'
    assert cfg.block_size == 1024 and cfg.n_layer == 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.max_iters = 3


@pytest.mark.parametrize('text,value', [('True', True), ('false', False), ('1', True), ('0', False)])
def test_bool_spellings(text, value):
    assert configure(Config, [f'--compile={text}']).compile is value


def test_int_given_for_float_is_accepted():
    assert configure(Config, ['--learning_rate=1']).learning_rate == 1.0


def test_optional_fields_take_none_or_their_type_only():
    assert configure(Config, ['--wandb_run_name=my-run']).wandb_run_name == 'my-run'
    assert configure(Config, ['--wandb_run_name=3']).wandb_run_name == '3'   # a str field keeps text
    assert configure(Config, ['--n_layer=None']).n_layer is None
    with pytest.raises(ConfigError, match=r"--n_layer=four: expected int"):
        configure(Config, ['--n_layer=four'])
    with pytest.raises(ConfigError, match=r"--max_iters=None: expected int"):
        configure(Config, ['--max_iters=None'])


def test_unknown_key_names_it_and_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'max_iter'.*did you mean 'max_iters'"):
        configure(Config, ['--max_iter=5'])


def test_wrong_type_names_key_value_and_type():
    with pytest.raises(ConfigError, match=r"--max_iters=ten: expected int"):
        configure(Config, ['--max_iters=ten'])
    with pytest.raises(ConfigError, match=r"--max_iters=1.5: expected int, got float"):
        configure(Config, ['--max_iters=1.5'])
    with pytest.raises(ConfigError, match=r"--compile=maybe: expected a bool"):
        configure(Config, ['--compile=maybe'])


def test_the_dataclass_validates_the_result():
    with pytest.raises(ConfigError, match='max_iters=-1: must be >= 0'):
        configure(Config, ['--max_iters=-1'])


def test_missing_value_is_an_error():
    with pytest.raises(ConfigError, match='missing value'):
        configure(Config, ['--max_iters'])


def test_config_file_then_overrides(tmp_path):
    f = tmp_path / 'c.py'
    f.write_text("import math\nmax_iters = 50\nlearning_rate = 2e-5\nblock_size = 2 ** 9\n")
    cfg = configure(Config, [str(f), '--max_iters=7'])
    assert cfg.max_iters == 7 and cfg.learning_rate == 2e-5 and cfg.block_size == 512


def test_config_file_unknown_key_names_file(tmp_path):
    f = tmp_path / 'c.py'
    f.write_text("learning_rat = 1e-3\n")
    with pytest.raises(ConfigError, match=r"c\.py: unknown config key 'learning_rat'.*'learning_rate'"):
        configure(Config, [str(f)])


def test_config_file_wrong_type_and_missing_file(tmp_path):
    f = tmp_path / 'c.py'
    f.write_text("max_iters = 'many'\n")
    with pytest.raises(ConfigError, match=r"max_iters = 'many': expected int"):
        configure(Config, [str(f)])
    with pytest.raises(ConfigError, match='config file not found'):
        configure(Config, [str(tmp_path / 'nope.py')])


def test_help_shows_each_key_its_value_after_the_config_file_and_its_comment(tmp_path):
    f = tmp_path / 'c.py'
    f.write_text("max_iters = 50\n")
    text = help_text(Config, [str(f), '--learning_rate=1e-3', '--help'], 'usage: x')
    lines = text.splitlines()
    assert lines[0] == 'usage: x' and str(f) in lines[1]
    line = {ln.split('=')[0].strip(): ln for ln in lines if ln.strip().startswith('--')}
    assert set(line) == {f'--{fl.name}' for fl in dataclasses.fields(Config)}
    assert '--max_iters=50' in line['--max_iters'] and line['--max_iters'].endswith('optimizer steps')
    assert '--learning_rate=0.001' in line['--learning_rate']
    assert line['--init_from'].endswith("'scratch' | 'resume' | a path: a checkpoint or an HF dir")
    assert line['--compile'].rstrip().endswith('True')   # no comment, no text after the value
    assert '  # training' in lines and '  # model' in lines
    assert lines.index('  # model') < lines.index(line['--block_size'])
