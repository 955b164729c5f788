"""Checkpoints: atomic save, prefix cleanup (torch.compile / DDP), clear errors, spec snippet."""
import os

import pytest
import torch

from checkpoint import (CheckpointError, clean_state_dict, load_checkpoint, optimizer_state_by_name,
                        save_checkpoint)
from model_builder import ConfigurableGPT
from model_config import ModelArchitectureConfig


def _model(**overrides):
    torch.manual_seed(0)
    return ConfigurableGPT(ModelArchitectureConfig.from_preset('tiny', vocab_size=101, **overrides))


def _ckpt(model, state_dict=None, **extra):
    return {'model': model.state_dict() if state_dict is None else state_dict,
            'model_args': model.config.to_dict(), 'iter_num': 7, 'best_val_loss': 1.5,
            'config': {'lr': 1e-4}, 'rng': {'torch': torch.get_rng_state()}, **extra}


def _same_outputs(a, b):
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(a.eval()(ids)[0], b.eval()(ids)[0])


def test_spec_snippet_rebuilds_the_model_from_our_checkpoint(tmp_path):
    model = _model()
    save_checkpoint(tmp_path / 'ckpt.pt', _ckpt(model))
    # the specification's loading code, verbatim apart from the path
    checkpoint = torch.load(tmp_path / 'ckpt.pt')
    model_args = checkpoint['model_args']
    arch_config = ModelArchitectureConfig.from_dict(model_args)
    rebuilt = ConfigurableGPT(arch_config)
    rebuilt.load_state_dict(checkpoint['model'])
    assert checkpoint['format_version'] == 1 and checkpoint['iter_num'] == 7
    assert _same_outputs(model, rebuilt)


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    model = _model()
    path = tmp_path / 'ckpt.pt'
    save_checkpoint(path, _ckpt(model))
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError('disk full')
    monkeypatch.setattr(torch, 'save', boom)
    with pytest.raises(OSError):
        save_checkpoint(path, _ckpt(model, iter_num=8))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ['ckpt.pt']


def test_load_checkpoint_of_compiled_and_ddp_models(tmp_path):
    model = _model()
    compiled_sd = {'_orig_mod.' + k: v for k, v in model.state_dict().items()}
    ddp_sd = {'module.' + k: v for k, v in model.state_dict().items()}
    both_sd = {'module._orig_mod.' + k: v for k, v in model.state_dict().items()}
    for name, sd in (('c', compiled_sd), ('d', ddp_sd), ('b', both_sd)):
        torch.save(_ckpt(model, sd), tmp_path / f'{name}.pt')   # as a plain training loop would
        loaded, ckpt = load_checkpoint(tmp_path / f'{name}.pt')
        assert _same_outputs(model, loaded), name
        assert loaded.lm_head.weight is loaded.transformer.wte.weight
        assert ckpt['iter_num'] == 7


def test_load_checkpoint_of_a_real_ddp_wrapped_model(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    store = dist.HashStore()
    dist.init_process_group('gloo', store=store, rank=0, world_size=1)
    try:
        model = _model()
        ddp = DDP(model)
        torch.save(_ckpt(model, ddp.state_dict()), tmp_path / 'ddp.pt')
        assert next(iter(ddp.state_dict())).startswith('module.')
    finally:
        dist.destroy_process_group()
    loaded, _ = load_checkpoint(tmp_path / 'ddp.pt')
    assert _same_outputs(model, loaded)


@pytest.mark.slow
def test_load_checkpoint_of_a_real_torch_compiled_model(tmp_path):
    model = _model()
    compiled = torch.compile(model, backend='eager')  # the wrapper alone adds '_orig_mod.'
    compiled(torch.zeros(1, 4, dtype=torch.long))
    assert next(iter(compiled.state_dict())).startswith('_orig_mod.')
    torch.save(_ckpt(model, compiled.state_dict()), tmp_path / 'c.pt')
    loaded, _ = load_checkpoint(tmp_path / 'c.pt')
    assert _same_outputs(model, loaded)


def test_clean_state_dict_strips_wrapper_prefixes():
    sd = {'_orig_mod.a.w': 1, 'module.b': 2, 'module._orig_mod.c': 3, 'd': 4}
    assert clean_state_dict(sd) == {'a.w': 1, 'b': 2, 'c': 3, 'd': 4}


def test_dropout_override_and_untied_model_round_trip(tmp_path):
    model = _model(tie_word_embeddings=False, dropout=0.1)
    save_checkpoint(tmp_path / 'x.pt', _ckpt(model))
    loaded, ckpt = load_checkpoint(tmp_path / 'x.pt', dropout=0.0)
    assert loaded.config.dropout == 0.0 and ckpt['model_args']['dropout'] == 0.0
    assert loaded.lm_head.weight is not loaded.transformer.wte.weight
    assert _same_outputs(model, loaded)


def test_nanogpt_style_checkpoint_loads(tmp_path):
    # nanoGPT model_args only; the non-flash causal-mask buffer saved as '.attn.bias'
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, bias=False, vocab_size=50, dropout=0.0)
    model = ConfigurableGPT(ModelArchitectureConfig.from_dict(args))
    sd = dict(model.state_dict())
    sd['transformer.h.0.attn.bias'] = torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16)
    torch.save({'model': sd, 'model_args': args, 'iter_num': 0}, tmp_path / 'n.pt')
    loaded, _ = load_checkpoint(tmp_path / 'n.pt')
    ids = torch.randint(0, 50, (1, 8))
    with torch.no_grad():
        assert torch.equal(model.eval()(ids)[0], loaded.eval()(ids)[0])


def test_missing_truncated_random_and_foreign_files_name_the_path(tmp_path):
    model = _model()
    good = tmp_path / 'good.pt'
    save_checkpoint(good, _ckpt(model))
    truncated = tmp_path / 'truncated.pt'
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    noise = tmp_path / 'noise.pt'
    noise.write_bytes(os.urandom(4096))
    foreign = tmp_path / 'foreign.pt'
    torch.save({'state_dict': model.state_dict()}, foreign)
    tensor = tmp_path / 'tensor.pt'
    torch.save(torch.zeros(3), tensor)
    for path in (tmp_path / 'missing.pt', truncated, noise, foreign, tensor):
        with pytest.raises(CheckpointError, match=path.name):
            load_checkpoint(path)
    assert issubclass(CheckpointError, ValueError)
    bad_args = tmp_path / 'bad_args.pt'
    torch.save({**_ckpt(model), 'model_args': {**model.config.to_dict(), 'n_embed': 3}}, bad_args)
    with pytest.raises(CheckpointError, match=r"bad_args.pt.*n_embed.*n_embd"):
        load_checkpoint(bad_args)
    wrong_shape = tmp_path / 'wrong_shape.pt'
    torch.save({**_ckpt(model), 'model_args': {**model.config.to_dict(), 'n_layer': 3}}, wrong_shape)
    with pytest.raises(CheckpointError, match='wrong_shape.pt'):
        load_checkpoint(wrong_shape)


def test_checkpoint_with_numpy_state_still_loads(tmp_path):
    np = pytest.importorskip('numpy')
    model = _model()
    save_checkpoint(tmp_path / 'np.pt', _ckpt(model, rng={'numpy': np.random.get_state()}))
    loaded, ckpt = load_checkpoint(tmp_path / 'np.pt')
    assert ckpt['rng']['numpy'][0] == 'MT19937'
    assert _same_outputs(model, loaded)


def test_optimizer_state_of_older_checkpoints_keyed_by_position_is_read_by_name(tmp_path):
    torch.manual_seed(0)
    model = ConfigurableGPT(ModelArchitectureConfig.from_preset('tiny'))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
    _, loss = model(torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]]))
    loss.backward()
    opt.step()
    by_name = optimizer_state_by_name(opt.state_dict(), opt, model)
    names = dict(model.named_parameters())
    assert sorted(by_name['state']) == sorted(names)
    for name, s in by_name['state'].items():
        assert torch.equal(s['exp_avg'], opt.state[names[name]]['exp_avg'])
    assert optimizer_state_by_name(by_name, opt, model) is by_name


def test_a_damaged_byte_inside_a_tensor_is_caught_by_the_crc_check_naming_the_file(tmp_path):
    model = _model()
    save_checkpoint(tmp_path / 'ckpt_000004.pt', {'model': model.state_dict(), 'model_args': model.config.to_dict()})
    path = tmp_path / 'ckpt.pt'
    save_checkpoint(path, {'model': model.state_dict(), 'model_args': model.config.to_dict()})
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    # mmap loading alone does not notice: without the check this would train on the damaged tensor
    damaged, _ = load_checkpoint(path, verify=False)
    assert any(not torch.equal(a, b) for a, b in zip(damaged.state_dict().values(), model.state_dict().values()))
    with pytest.raises(CheckpointError, match=r'ckpt\.pt: damaged checkpoint .*CRC.*ckpt_000004\.pt'):
        load_checkpoint(path)


@pytest.mark.parametrize('umask', [0o022, 0o077])
def test_checkpoints_get_the_file_modes_the_umask_gives(tmp_path, umask):
    import stat
    model = _model()
    old = os.umask(umask)
    try:
        save_checkpoint(tmp_path / 'ckpt.pt', {'model': model.state_dict(), 'model_args': model.config.to_dict()})
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / 'ckpt.pt').st_mode) == 0o666 & ~umask
