import pytest

from configurator import ConfigError, configure

DEFAULTS = {'max_iters': 100, 'learning_rate': 6e-4, 'compile': True, 'init_from': 'scratch',
            'block_size': 2048, 'wandb_run_name': None, 'betas': (0.9, 0.95)}


def test_overrides_are_typed_by_default():
    cfg = configure(DEFAULTS, ['--max_iters=10', '--learning_rate=3e-4', '--compile=False',
                               '--init_from=hf:/x/y', '--block_size', '1024'])
    assert cfg['max_iters'] == 10 and type(cfg['max_iters']) is int
    assert cfg['learning_rate'] == 3e-4
    assert cfg['compile'] is False
    assert cfg['init_from'] == 'hf:/x/y'
    assert cfg['block_size'] == 1024


@pytest.mark.parametrize('text,value', [('True', True), ('false', False), ('1', True), ('0', False)])
def test_bool_spellings(text, value):
    assert configure(DEFAULTS, [f'--compile={text}'])['compile'] is value


def test_int_given_for_float_is_accepted():
    assert configure(DEFAULTS, ['--learning_rate=1'])['learning_rate'] == 1.0


def test_none_default_takes_any_literal_or_string():
    assert configure(DEFAULTS, ['--wandb_run_name=3'])['wandb_run_name'] == 3
    assert configure(DEFAULTS, ['--wandb_run_name=my-run'])['wandb_run_name'] == 'my-run'


def test_unknown_key_names_it_and_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'max_iter'.*did you mean 'max_iters'"):
        configure(DEFAULTS, ['--max_iter=5'])


def test_wrong_type_names_key_value_and_type():
    with pytest.raises(ConfigError, match=r"--max_iters=ten: expected int"):
        configure(DEFAULTS, ['--max_iters=ten'])
    with pytest.raises(ConfigError, match=r"--max_iters=1.5: expected int, got float"):
        configure(DEFAULTS, ['--max_iters=1.5'])
    with pytest.raises(ConfigError, match=r"--compile=maybe: expected a bool"):
        configure(DEFAULTS, ['--compile=maybe'])


def test_missing_value_is_an_error():
    with pytest.raises(ConfigError, match='missing value'):
        configure(DEFAULTS, ['--max_iters'])


def test_config_file_then_overrides(tmp_path):
    f = tmp_path / 'c.py'
    f.write_text("import math\nmax_iters = 50\nlearning_rate = 2e-5\nblock_size = 2 ** 9\n")
    cfg = configure(DEFAULTS, [str(f), '--max_iters=7'])
    assert cfg['max_iters'] == 7 and cfg['learning_rate'] == 2e-5 and cfg['block_size'] == 512


def test_config_file_unknown_key_names_file(tmp_path):
    f = tmp_path / 'c.py'
    f.write_text("learning_rat = 1e-3\n")
    with pytest.raises(ConfigError, match=r"c\.py: unknown config key 'learning_rat'.*'learning_rate'"):
        configure(DEFAULTS, [str(f)])


def test_config_file_wrong_type_and_missing_file(tmp_path):
    f = tmp_path / 'c.py'
    f.write_text("max_iters = 'many'\n")
    with pytest.raises(ConfigError, match=r"max_iters = 'many': expected int"):
        configure(DEFAULTS, [str(f)])
    with pytest.raises(ConfigError, match='config file not found'):
        configure(DEFAULTS, [str(tmp_path / 'nope.py')])
