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
    return ConfigurableGPT(ModelArchitectureConfig.from_preset('tiny', **{'vocab_size': 101, **overrides}))


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


# ---------------------------------------------------------------- sharded checkpoints (one process)
# The multi-rank cases (FSDP shards, resharding, kills under torchrun) are in test_train_sft.py and
# test_reliability.py; here the layout, pointers, rotation and errors, written by one process.

def _trained(steps=1, seed=0, **overrides):
    """A tiny model and its AdamW after `steps` steps: optimizer state that is not all zeros."""
    model = _model(**overrides)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, 101, (2, 9), generator=g)
        _, loss = model(ids, labels=ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _save_sharded(out, model, opt, it, step_file=True, is_best=False, keep_last_n=0):
    from checkpoint import save_training_state
    from tokenizer import load_tokenizer
    extra = {'config': {'chat_template': 'chatml'}, 'tokenizer': load_tokenizer('qwen3').meta(),
             'data_state': {'epoch': 0, 'position': 4 * it}}
    return save_training_state(out, model, opt, iter_num=it, best_val_loss=1.0 / it, step_file=step_file,
                               is_best=is_best, keep_last_n=keep_last_n, sharded=True, extra=extra)


def test_sharded_checkpoint_restores_model_optimizer_and_metadata_exactly(tmp_path):
    from checkpoint import materialize, open_sharded_checkpoint, restore_training_state
    model, opt = _trained(steps=2)
    msg = _save_sharded(tmp_path, model, opt, 2, is_best=True)
    assert msg == 'saved ckpt_000002/ (1 shard), ckpt.pt and ckpt_best.pt -> it, at iter 2'
    assert sorted(os.listdir(tmp_path / 'ckpt_000002')) == ['.metadata', '__0_0.distcp', 'meta.pt']
    assert os.readlink(tmp_path / 'ckpt.pt') == 'ckpt_000002' == os.readlink(tmp_path / 'ckpt_best.pt')
    for path in (tmp_path / 'ckpt.pt', tmp_path / 'ckpt_000002'):   # the link or the directory
        loaded, ck = load_checkpoint(path)
        assert _same_outputs(model, loaded)
        assert loaded.lm_head.weight is loaded.transformer.wte.weight
        assert ck['iter_num'] == 2 and ck['data_state']['position'] == 8 and len(ck['rng']) == 1
    # the resume path: an empty model, then weights and optimizer state together
    empty, ck = open_sharded_checkpoint(tmp_path / 'ckpt.pt')
    assert all(p.is_meta for p in empty.parameters())
    materialize(empty, 'cpu')
    opt2 = empty.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
    assert restore_training_state(ck, empty, opt2, log=lambda *a: None) == (2, 0.5, 2)
    for a, b in zip(model.state_dict().values(), empty.state_dict().values()):
        assert torch.equal(a, b)
    sa, sb = opt.state_dict(), opt2.state_dict()
    assert sa['param_groups'] == sb['param_groups']
    for i, s in sa['state'].items():
        for k, v in s.items():
            assert torch.equal(v, sb['state'][i][k]), (i, k)


def test_sharded_saves_move_the_links_and_rotate_but_keep_what_they_point_at(tmp_path):
    model, opt = _trained()
    save_checkpoint(tmp_path / 'ckpt.pt', _ckpt(model))   # a one-file ckpt.pt from an earlier run
    _save_sharded(tmp_path, model, opt, 2, is_best=True, keep_last_n=1)
    _save_sharded(tmp_path, model, opt, 4, keep_last_n=1)
    _save_sharded(tmp_path, model, opt, 5, step_file=False, keep_last_n=1)   # a stop between evaluations
    assert os.readlink(tmp_path / 'ckpt.pt') == 'ckpt_000005_stop'
    assert sorted(os.listdir(tmp_path)) == ['ckpt.pt', 'ckpt_000002', 'ckpt_000004', 'ckpt_000005_stop',
                                            'ckpt_best.pt']   # 2 stays: ckpt_best.pt points at it
    _save_sharded(tmp_path, model, opt, 6, keep_last_n=1)
    assert os.readlink(tmp_path / 'ckpt.pt') == 'ckpt_000006' and os.readlink(tmp_path / 'ckpt_best.pt') == 'ckpt_000002'
    assert sorted(os.listdir(tmp_path)) == ['ckpt.pt', 'ckpt_000002', 'ckpt_000006', 'ckpt_best.pt']
    assert load_checkpoint(tmp_path / 'ckpt.pt')[1]['iter_num'] == 6
    assert load_checkpoint(tmp_path / 'ckpt_best.pt')[1]['iter_num'] == 2
    (tmp_path / 'ckpt_000006' / '.metadata').write_bytes(b'damaged')   # the error says where to go back to
    with pytest.raises(CheckpointError, match=r'ckpt_000006: damaged .*`ln -sfn ckpt_000002 .*ckpt\.pt`'):
        load_checkpoint(tmp_path / 'ckpt.pt')


def test_failed_or_killed_sharded_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    from torch.distributed.checkpoint import FileSystemWriter
    model, opt = _trained()
    _save_sharded(tmp_path, model, opt, 2)
    # what a SIGKILL mid-save leaves: a temporary directory of a dead process, partly written
    dead = tmp_path / '.ckpt_000004.999999999.ab12cd34.tmp'
    dead.mkdir()
    (dead / '__0_0.distcp').write_bytes(b'partial')
    assert load_checkpoint(tmp_path / 'ckpt.pt')[1]['iter_num'] == 2

    def disk_full(self, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(FileSystemWriter, 'write_data', disk_full)
    with pytest.raises(CheckpointError, match=r'ckpt_000006 at iter 6: .*No space left.*ckpt\.pt is the last'):
        _save_sharded(tmp_path, model, opt, 6)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ['ckpt.pt', 'ckpt_000002']   # the dead save's leftovers too
    assert load_checkpoint(tmp_path / 'ckpt.pt')[1]['iter_num'] == 2


def test_damaged_sharded_checkpoint_is_a_clear_error_naming_it(tmp_path):
    import shutil
    model, opt = _trained()
    _save_sharded(tmp_path / 'good', model, opt, 2)
    cases = {'no_shard': lambda d: (d / '__0_0.distcp').unlink(),
             'short_shard': lambda d: (d / '__0_0.distcp').write_bytes((d / '__0_0.distcp').read_bytes()[:100]),
             'no_meta': lambda d: (d / 'meta.pt').unlink(),
             'bad_meta': lambda d: (d / 'meta.pt').write_bytes(b'garbage'),
             'no_metadata': lambda d: (d / '.metadata').unlink()}
    for name, damage in cases.items():
        d = tmp_path / name
        shutil.copytree(tmp_path / 'good' / 'ckpt_000002', d)
        damage(d)
        with pytest.raises(CheckpointError, match=name):
            load_checkpoint(d)
    # one flipped bit inside a tensor: DCP alone would load it; the sha256 in meta.pt does not match
    d = tmp_path / 'flipped'
    shutil.copytree(tmp_path / 'good' / 'ckpt_000002', d)
    from torch.distributed.checkpoint import FileSystemReader
    where = max((v for k, v in FileSystemReader(d).read_metadata().storage_data.items()   # not the tied wte
                 if k.fqn.startswith('model.transformer.h.0.')), key=lambda v: v.length)
    data = bytearray((d / where.relative_path).read_bytes())
    data[where.offset + where.length // 2] ^= 0x10
    (d / where.relative_path).write_bytes(bytes(data))
    damaged, _ = load_checkpoint(d, verify=False)
    assert not _same_outputs(model, damaged)
    with pytest.raises(CheckpointError, match=r'flipped: damaged sharded checkpoint: __0_0\.distcp does not match.*no older'):
        load_checkpoint(d)
    other = tmp_path / 'other'   # the right files, another model
    model2 = ConfigurableGPT(ModelArchitectureConfig.from_preset('tiny', vocab_size=101, n_layer=3))
    _save_sharded(other, model2, model2.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu'), 2)
    meta = torch.load(tmp_path / 'good' / 'ckpt_000002' / 'meta.pt', weights_only=False)   # model_args of 'good'
    meta['shard_sha256'] = torch.load(other / 'ckpt_000002' / 'meta.pt', weights_only=False)['shard_sha256']
    save_checkpoint(other / 'ckpt_000002' / 'meta.pt', meta)
    with pytest.raises(CheckpointError, match=r'ckpt_000002: weights do not fit model_args: .*unexpected.*h\.2'):
        load_checkpoint(other / 'ckpt.pt')


@pytest.mark.slow
def test_export_and_sample_read_a_sharded_checkpoint(tmp_path):
    import export_hf
    import sample_sft
    from hf_interop import from_hf
    from tokenizer import load_tokenizer
    model, opt = _trained(vocab_size=load_tokenizer('qwen3').vocab_size)
    _save_sharded(tmp_path, model, opt, 2)
    for path in (tmp_path / 'ckpt.pt', tmp_path / 'ckpt_000002'):
        loaded, _, template = sample_sft.load_model(str(path))   # eval_sft.py loads through it too
        assert _same_outputs(model, loaded) and template.name == 'chatml'
    export_hf.export(str(tmp_path / 'ckpt.pt'), str(tmp_path / 'hf'))
    assert _same_outputs(model, from_hf(str(tmp_path / 'hf')))


def test_device_string_is_checked_by_name_before_anything_loads(monkeypatch):
    from checkpoint import check_device
    check_device('cpu')
    for bad in ('gpu', 'cpu:0', 'cuda:x', 'CUDA', ''):
        with pytest.raises(ValueError, match=rf"device={bad!r}: expected cpu, cuda, cuda:N, mps"):
            check_device(bad)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    for missing in ('cuda', 'cuda:1'):
        with pytest.raises(ValueError, match=rf"device={missing!r}: CUDA is not available here"):
            check_device(missing)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    check_device('cuda:1')
    with pytest.raises(ValueError, match=r"device='cuda:2': there are 2 CUDA devices here \(cuda:0 to cuda:1\)"):
        check_device('cuda:2')
