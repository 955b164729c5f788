"""Tests for train_sft.py: loss normalization, the loop, resume, DDP (data: test_sft_data.py)."""
import dataclasses
import os
import types

import numpy as np
import pytest
import torch

import train_sft
from configurator import ConfigError
from test_sft_data import ListSplit  # the in-memory split the data tests use
from train_sft import SFTDataset


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    cfg = types.SimpleNamespace(decay_lr=True, learning_rate=1e-3, min_lr=1e-4, warmup_iters=10,
                                lr_decay_iters=100)
    lrs = [train_sft.get_lr(i, cfg) for i in range(120)]
    assert lrs[0] < lrs[5] < lrs[9] <= 1e-3
    assert abs(lrs[10] - 1e-3) < 1e-12 and abs(lrs[100] - 1e-4) < 1e-12 and lrs[119] == 1e-4
    assert all(a >= b for a, b in zip(lrs[10:100], lrs[11:101]))


# ---------------------------------------------------------------- the loop (tiny model, tiny shards)

IM_START, IM_END, PAD = 151644, 151645, 151643
WORDS = 'red green blue cat dog sun moon tree fish bird'.split()


def toy_conversation(rng):
    """Token ids of a learnable chat: the assistant repeats the user's tokens."""
    n = int(rng.integers(3, 12))
    user = rng.integers(100, 140, n).tolist()
    ids = [IM_START, 872, 198] + user + [IM_END, 198, IM_START, 77091, 198] + user + [IM_END]
    labels = [-100] * (len(ids) - n - 1) + user + [IM_END]
    return ids, labels


def write_shards(out_dir, n=96, seed=0, val_fraction=0.2):
    """A tiny data set through the real pipeline: JSONL -> prepare_sft.py -> shards."""
    import json

    import prepare_sft
    rng = np.random.default_rng(seed)
    jsonl = out_dir.parent / 'toy.jsonl'
    with open(jsonl, 'w') as f:
        for _ in range(n):
            words = ' '.join(rng.choice(WORDS, int(rng.integers(2, 8))))
            f.write(json.dumps({'messages': [{'role': 'user', 'content': f'repeat: {words}'},
                                             {'role': 'assistant', 'content': words}]}) + '\n')
    prepare_sft.main(['--input', str(jsonl), '--out_dir', str(out_dir), '--val_fraction', str(val_fraction),
                      '--max_length', '64'])
    return out_dir


def tiny_cfg(tmp_path, **over):
    cfg = dict(out_dir=str(tmp_path / 'out'), data_dir=str(tmp_path / 'data'), init_from='scratch',
               model_preset='tiny', block_size=64, batch_size=4, gradient_accumulation_steps=1,
               learning_rate=3e-3, min_lr=3e-4, warmup_iters=2, lr_decay_iters=20, max_iters=20,
               eval_interval=10, eval_iters=2, log_interval=1, dropout=0.0, device='cpu',
               dtype='float32', compile=False)
    return train_sft.TrainConfig(**{**cfg, **over})


def cli_args(cfg):
    """The --key=value arguments that give cfg on the command line."""
    default = train_sft.TrainConfig()
    return [f'--{k}={v}' for k, v in dataclasses.asdict(cfg).items() if v != getattr(default, k)]


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp('shards') / 'data')


@pytest.fixture(scope='module')
def mix_dir(tmp_path_factory):
    """Two sources of the toy task weighted 0.7 / 0.3 by trained tokens (the small one upsampled)."""
    import json

    import prepare_sft
    tmp = tmp_path_factory.mktemp('mix')
    rng = np.random.default_rng(4)
    paths = []
    for name, n in (('big', 80), ('small', 16)):
        paths.append(tmp / f'{name}.jsonl')
        with open(paths[-1], 'w') as f:
            for _ in range(n):
                words = ' '.join(rng.choice(WORDS, int(rng.integers(2, 8))))
                f.write(json.dumps({'messages': [{'role': 'user', 'content': f'{name}: {words}'},
                                                 {'role': 'assistant', 'content': words}]}) + '\n')
    prepare_sft.main(['--input', f'{paths[0]}:0.7', f'{paths[1]}:0.3', '--out_dir', str(tmp / 'data'),
                      '--mix_by', 'tokens', '--val_fraction', '0.2', '--max_length', '64'])
    return tmp / 'data'


def saved_state(path):
    """(model state, optimizer state, the other keys) of a checkpoint of either format, read whole in
    this process: a file, or a sharded checkpoint's directory (or ckpt.pt linking to one)."""
    import os
    import warnings
    if os.path.isdir(path):
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys
        with warnings.catch_warnings():   # "assuming the intent is to load in a single process": yes
            warnings.simplefilter('ignore')
            sd = _load_state_dict_from_keys(checkpoint_id=os.path.realpath(path))
        return sd['model'], sd['optimizer'], torch.load(os.path.join(path, 'meta.pt'), weights_only=False)
    ck = torch.load(path, map_location='cpu', weights_only=False)
    return ck.pop('model'), ck.pop('optimizer'), ck


def params_of(path):
    return saved_state(path)[0]


def assert_same_state(a, b, what):
    """Two checkpoints hold bit-identical model and optimizer state."""
    (ma, oa, _), (mb, ob, _) = saved_state(a), saved_state(b)
    assert ma.keys() == mb.keys() and oa['state'].keys() == ob['state'].keys(), what
    for k in ma:
        assert torch.equal(ma[k], mb[k]), f'{what}: {k}'
    for k, s in oa['state'].items():
        for name, v in s.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(ob['state'][k][name])), f'{what}: {k}.{name}'


def toy_gen_set(path, n=8, seed=5):
    """A held-out set for the generation evals: the toy task with its expected replies."""
    import json
    rng = np.random.default_rng(seed)
    with open(path, 'w') as f:
        for _ in range(n):
            words = ' '.join(rng.choice(WORDS, int(rng.integers(2, 5))))
            f.write(json.dumps({'messages': [{'role': 'user', 'content': f'repeat: {words}'},
                                             {'role': 'assistant', 'content': words}],
                                'reference': words, 'task': 'repeat'}) + '\n')
    return str(path)


def run_log(out_dir):
    import json
    (path,) = [p for p in out_dir.iterdir() if p.name.startswith('run_') and p.suffix == '.json']
    return json.loads(path.read_text())


def gen_metrics(out_dir):
    """(iter, accuracy, format, the reply to the first conversation) of each generation eval."""
    return [(e['iter'], e['accuracy'], e['format_compliance'], e['sample']['reply'])
            for e in run_log(out_dir)['evals'] if 'accuracy' in e]


@pytest.mark.slow
def test_tiny_model_trains_and_writes_checkpoints_and_run_log(tmp_path, data_dir):
    import json
    cfg = tiny_cfg(tmp_path, data_dir=str(data_dir), max_iters=12, eval_interval=6, keep_last_n=1)
    summary = train_sft.train(cfg)
    out = tmp_path / 'out'
    names = sorted(p.name for p in out.iterdir())
    assert {'ckpt_000012.pt', 'ckpt.pt', 'ckpt_best.pt'} <= set(names)
    assert 'ckpt_000006.pt' not in names   # keep_last_n=1
    runs = [n for n in names if n.startswith('run_') and n.endswith('.json')]
    assert len(runs) == 1
    log = json.loads((out / runs[0]).read_text())
    assert set(log) == {'config', 'iters', 'evals', 'summary'}
    assert len(log['iters']) == 12 and {'iter', 'loss', 'lr', 'grad_norm', 'tokens', 'trained_tokens',
                                         'tok_per_s', 'time'} <= set(log['iters'][0])
    evals = log['evals']
    assert [e['iter'] for e in evals] == [0, 6, 12]
    assert evals[-1]['val_loss'] < evals[0]['val_loss'] - 1.0, evals
    assert summary['iters'] == 12
    # the specification's loading snippet rebuilds the model from ckpt.pt
    from model_builder import ConfigurableGPT
    from model_config import ModelArchitectureConfig
    checkpoint = torch.load(out / 'ckpt.pt')   # as written in the spec: weights_only (the default) works
    model = ConfigurableGPT(ModelArchitectureConfig.from_dict(checkpoint['model_args']))
    model.load_state_dict(checkpoint['model'])
    assert checkpoint['iter_num'] == 12 and checkpoint['format_version'] == 1
    assert checkpoint['config']['max_iters'] == 12
    assert {'epoch', 'position'} <= set(checkpoint['data_state'])
    loaded, _ = train_sft.load_checkpoint(str(out / 'ckpt.pt'), 'cpu')
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_token_weighting_is_independent_of_the_micro_batch_split(data_dir):
    from model_builder import ConfigurableGPT
    from model_config import ModelArchitectureConfig
    rng = np.random.default_rng(1)
    examples = [toy_conversation(rng) for _ in range(3)]
    long_ids = [IM_START] + rng.integers(100, 140, 40).tolist()
    long_labels = [-100] * 20 + long_ids[20:]
    examples = [examples[0], (long_ids, long_labels), ([IM_START, 872, 198, 5, 6], [-100] * 5), examples[1]]
    ds = SFTDataset(ListSplit(examples), block_size=64, pad_id=PAD)
    torch.manual_seed(0)
    model = ConfigurableGPT(ModelArchitectureConfig.from_preset('tiny'))

    def grads(batches):
        model.zero_grad(set_to_none=True)
        train_sft.forward_backward(model, batches, 'cpu')
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    one = grads([ds.collate([[0], [1], [2], [3]])])          # batch 4 x accum 1
    four = grads([ds.collate([[i]]) for i in range(4)])       # batch 1 x accum 4
    # reference: mean over every trained token of the four examples, computed one example at a time
    model.zero_grad(set_to_none=True)
    total = sum(int((ds.collate([[i]])['labels'][:, 1:] != -100).sum()) for i in range(4))
    for i in range(4):
        b = ds.collate([[i]])
        _, s = model(b['input_ids'], labels=b['labels'], reduction='sum')
        (s / total).backward()
    ref = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert len(one) == len(four) == len(ref)
    for a, b, c in zip(one, four, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
    # a micro-batch (or a whole step) with no trained token contributes exactly zero, never NaN
    empty = grads([ds.collate([[2]])])
    assert all(torch.all(g == 0) for g in empty)


@pytest.mark.slow
def test_bfloat16_on_a_cpu_trains_under_autocast_with_fp32_weights(tmp_path, data_dir, capsys, monkeypatch):
    import json
    monkeypatch.setattr(train_sft, 'cpu_has_fast', lambda dtype: False)   # as on a CPU without AVX512-BF16
    losses = {}
    for dtype in ('float32', 'bfloat16'):
        train_sft.train(tiny_cfg(tmp_path / dtype, data_dir=str(data_dir), max_iters=4, eval_interval=4, dtype=dtype))
        run = next((tmp_path / dtype / 'out').glob('run_*.json'))
        losses[dtype] = [it['loss'] for it in json.loads(run.read_text())['iters']]
        assert all(v.dtype == torch.float32 for v in params_of(tmp_path / dtype / 'out' / 'ckpt.pt').values())
    # bf16 matmuls: not the fp32 numbers, but the same training
    assert losses['float32'] != losses['bfloat16']
    assert losses['bfloat16'] == pytest.approx(losses['float32'], abs=0.05)
    out = capsys.readouterr().out
    assert 'cpu float32' in out and 'cpu bfloat16 autocast (fp32 weights)' in out
    assert out.count('warning: this CPU has no bfloat16 matrix instructions') == 1


def test_resume_after_sigterm_matches_uninterrupted_run(tmp_path, data_dir, monkeypatch):
    import os
    import signal
    common = dict(data_dir=str(data_dir), max_iters=8, lr_decay_iters=8, eval_interval=4, dropout=0.1,
                  batch_size=2, gradient_accumulation_steps=2, packing=True)
    straight = tiny_cfg(tmp_path / 'a', **common)
    train_sft.train(straight)

    interrupted = tiny_cfg(tmp_path / 'b', **common)
    real_get_lr = train_sft.get_lr

    def get_lr_then_sigterm(it, cfg):   # the signal arrives during step 3 (0-based): stop after it
        if it == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_get_lr(it, cfg)

    monkeypatch.setattr(train_sft, 'get_lr', get_lr_then_sigterm)
    summary = train_sft.train(interrupted)
    monkeypatch.setattr(train_sft, 'get_lr', real_get_lr)
    assert summary['iters'] == 4 and summary['stopped_early']
    assert torch.load(tmp_path / 'b' / 'out' / 'ckpt.pt', weights_only=False)['iter_num'] == 4
    train_sft.train(dataclasses.replace(interrupted, init_from='resume'))
    # the eval + step checkpoint due at iter 4 was not lost to the stop
    assert (tmp_path / 'b' / 'out' / 'ckpt_000004.pt').exists()
    a = params_of(tmp_path / 'a' / 'out' / 'ckpt.pt')
    b = params_of(tmp_path / 'b' / 'out' / 'ckpt.pt')
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_generation_evals_are_logged_with_the_loss_evals_and_timed(tmp_path, data_dir, capsys):
    cfg = tiny_cfg(tmp_path, data_dir=str(data_dir), max_iters=4, eval_interval=2, gen_eval_interval=1,
                   gen_eval_data=toy_gen_set(tmp_path / 'gen.jsonl'), gen_eval_max_new_tokens=5)
    summary = train_sft.train(cfg)
    evals = run_log(tmp_path / 'out')['evals']
    assert [e['iter'] for e in evals] == [0, 1, 2, 3, 4]
    assert [('val_loss' in e) for e in evals] == [True, False, True, False, True]
    for e in evals:
        assert 0 <= e['accuracy'] <= 1 and 0 <= e['format_compliance'] <= 1 and e['with_reference'] == 8
        assert set(e['accuracy_per_task']) == {'repeat'} and e['gen_eval_s'] > 0
        assert e['sample']['prompt'].startswith('repeat: ') and isinstance(e['sample']['reply'], str)
    assert summary['gen_eval_time_s'] == pytest.approx(sum(e['gen_eval_s'] for e in evals))
    assert 0 < summary['gen_eval_share'] < 1
    out = capsys.readouterr().out
    assert 'gen eval iter 4: accuracy' in out and 'generation evals took' in out


def scripted_accuracy(monkeypatch, values):
    """sharded_eval replaced by a script: the n-th call reports values[n]."""
    calls = []

    def fake(model, held, batch_size, rank, world, all_reduce, fsdp):
        calls.append(1)
        v = values[len(calls) - 1]
        return {'accuracy': v, 'format_compliance': 1.0, 'accuracy_per_task': {}, 'correct': 0,
                'with_reference': 8, 'sample': {'prompt': 'p', 'reply': 'r', 'reference': 'r'},
                'gen_eval_s': 0.0}
    monkeypatch.setattr(train_sft, 'sharded_eval', fake)


@pytest.mark.slow
def test_best_checkpoint_follows_accuracy_and_patience_stops_the_run_across_a_resume(tmp_path, data_dir,
                                                                                    monkeypatch):
    # evals at 0, 2, 4, 6, 8: the best accuracy is at 4; 6 is worse and 8 only ties, so with a
    # patience of 2 the run stops at 8 -- also when it was interrupted at 6 and resumed.
    accuracy = [0.0, 0.2, 0.5, 0.4, 0.5, 0.9]
    common = dict(data_dir=str(data_dir), max_iters=20, lr_decay_iters=20, eval_interval=2,
                  gen_eval_data=toy_gen_set(tmp_path / 'gen.jsonl'), best_metric='accuracy',
                  early_stopping_patience=2)
    scripted_accuracy(monkeypatch, accuracy)
    summary = train_sft.train(tiny_cfg(tmp_path / 'a', **common))
    assert summary['iters'] == 8 and summary['early_stopped'] and summary['best_metric_value'] == 0.5
    best = torch.load(tmp_path / 'a' / 'out' / 'ckpt_best.pt', weights_only=False)
    assert best['iter_num'] == 4 and best['best_metric'] == {'name': 'accuracy', 'value': 0.5, 'since': 0}

    scripted_accuracy(monkeypatch, accuracy[:4])
    first = train_sft.train(tiny_cfg(tmp_path / 'b', **dict(common, max_iters=6)))
    assert first['iters'] == 6 and not first['early_stopped']
    scripted_accuracy(monkeypatch, accuracy[4:])
    resumed = train_sft.train(tiny_cfg(tmp_path / 'b', **dict(common, init_from='resume')))
    assert resumed['iters'] == 8 and resumed['early_stopped']
    assert torch.load(tmp_path / 'b' / 'out' / 'ckpt_best.pt', weights_only=False)['iter_num'] == 4


@pytest.mark.slow
def test_weighted_mixture_trains_and_resumes_bit_exactly(tmp_path, capsys):
    import json

    import prepare_sft
    rng = np.random.default_rng(3)
    paths = []
    for name, n in (('chat', 60), ('math', 12)):
        path = tmp_path / f'{name}.jsonl'
        with open(path, 'w') as f:
            for _ in range(n):
                words = ' '.join(rng.choice(WORDS, int(rng.integers(2, 8))))
                f.write(json.dumps({'messages': [{'role': 'user', 'content': f'{name}: {words}'},
                                                 {'role': 'assistant', 'content': words}]}) + '\n')
        paths.append(str(path))
    data = tmp_path / 'mix'
    prepare_sft.main(['--input', f'{paths[0]}:0.5', f'{paths[1]}:0.5', '--out_dir', str(data),
                      '--val_fraction', '0.1', '--max_length', '64'])
    common = dict(data_dir=str(data), max_iters=6, lr_decay_iters=6, eval_interval=3, batch_size=4,
                  mixture_by='tokens', packing=True)
    train_sft.train(tiny_cfg(tmp_path / 'a', **common))
    out = capsys.readouterr().out
    assert 'mixture by tokens' in out and f'{paths[1]}: weight 0.500 -> ' in out
    train_sft.train(tiny_cfg(tmp_path / 'b', **dict(common, max_iters=3)))
    train_sft.train(tiny_cfg(tmp_path / 'b', **dict(common, init_from='resume')))
    a, b = params_of(tmp_path / 'a' / 'out' / 'ckpt.pt'), params_of(tmp_path / 'b' / 'out' / 'ckpt.pt')
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(tmp_path / 'b' / 'out' / 'ckpt.pt', weights_only=False)['data_state']
    assert state['mixture'] == {'by': 'tokens', 'names': paths, 'weights': [0.5, 0.5]}


# ---------------------------------------------------------------- clear errors before training

def test_bad_override_is_a_clear_error(capsys):
    with pytest.raises(SystemExit, match=r"unknown config key 'learning_rat'.*'learning_rate'"):
        train_sft.main(['--learning_rat=1e-3'])
    with pytest.raises(SystemExit, match=r"--max_iters=abc: expected int"):
        train_sft.main(['--max_iters=abc'])


def test_help_lists_every_key(capsys):
    train_sft.main(['--help'])
    out = capsys.readouterr().out
    assert all(f'--{f.name}=' in out for f in dataclasses.fields(train_sft.TrainConfig))


def test_optimizer_schedule_and_preset_values_are_clear_errors_before_anything_runs(tmp_path):
    """Values torch or numpy would reject with a traceback mid-setup, or take silently (a min_lr above
    the peak raises the rate along the cosine), as one error line naming the key."""
    ckpt = tmp_path / 'ckpt.pt'
    ckpt.write_bytes(b'PK\x03\x04\x00\xff\xfe binary')
    for args, error in ((['--model_preset=Qwen3-0.6B'], r"model_preset='Qwen3-0.6B': expected one of \[.*'qwen3-0.6b'"),
                        (['--learning_rate=-1'], r'learning_rate=-1.0: must be >= 0'),
                        (['--beta1=1.5'], r'beta1=1.5: must be in \[0, 1\)'),
                        (['--grad_clip=-1'], r'grad_clip=-1.0: must be >= 0'),
                        (['--seed=-1'], r'seed=-1: must be in \[0, 2\*\*32\)'),
                        (['--learning_rate=2e-5', '--min_lr=3e-4'], r'min_lr=0.0003 is above learning_rate=2e-05'),
                        ([str(ckpt)], rf'{ckpt}: not a python config file \(binary'),
                        (['--device=gpu'], r"device='gpu': expected cpu, cuda, cuda:N, mps")):
        with pytest.raises(SystemExit, match=error):
            train_sft.main(args + [f'--out_dir={tmp_path / "out"}'])
    assert not (tmp_path / 'out').exists()
    train_sft.TrainConfig(learning_rate=2e-5, min_lr=3e-4, decay_lr=False)   # no schedule: min_lr unused


def test_data_without_a_val_split_trains_with_a_note_and_cannot_drive_early_stopping(tmp_path, capsys):
    """Otherwise every evaluation says 'val loss nan', no ckpt_best.pt appears, and early stopping on
    the val loss would stop the run after `patience` evaluations without a (comparable) number."""
    data = write_shards(tmp_path / 'data', n=24, val_fraction=0)
    with pytest.raises(train_sft.TrainError, match=r"early_stopping_patience=2 follows the val loss, but .* no val"):
        train_sft.train(tiny_cfg(tmp_path, data_dir=str(data), early_stopping_patience=2))
    train_sft.train(tiny_cfg(tmp_path, data_dir=str(data), max_iters=2, eval_interval=2))
    assert 'has no val examples (prepared with --val_fraction 0?): the val loss is nan, and no ckpt_best.pt' \
        in capsys.readouterr().out
    assert (tmp_path / 'out' / 'ckpt.pt').exists()


def test_resume_with_another_data_order_says_the_cursor_now_points_elsewhere(tmp_path, data_dir, capsys):
    """seed, packing and block_size make the order the saved cursor indexes: changed, the rest of
    the epoch repeats some examples and skips others."""
    train_sft.train(tiny_cfg(tmp_path, data_dir=str(data_dir), max_iters=2, eval_interval=2))
    capsys.readouterr()
    train_sft.train(tiny_cfg(tmp_path, data_dir=str(data_dir), max_iters=3, eval_interval=2, init_from='resume',
                             seed=7, block_size=48))
    out = capsys.readouterr().out
    assert 'warning: seed 1337 -> 7, block_size 64 -> 48 since the checkpoint: the data cursor' in out, out[-2000:]
    train_sft.train(tiny_cfg(tmp_path, data_dir=str(data_dir), max_iters=4, eval_interval=2, init_from='resume',
                             seed=7, block_size=48))
    assert 'the data cursor' not in capsys.readouterr().out


def test_attention_varlen_on_a_cpu_is_a_clear_error(tmp_path, data_dir):
    with pytest.raises(train_sft.TrainError, match=r"attention='varlen' needs CUDA"):
        train_sft.train(tiny_cfg(tmp_path, data_dir=str(data_dir), attention='varlen', packing=True, max_iters=1))


def test_generation_eval_settings_and_sets_are_checked_before_training(tmp_path, data_dir):
    with pytest.raises(SystemExit, match=r"best_metric='accuracy' is a generation-eval metric: set gen_eval_data"):
        train_sft.main(['--best_metric=accuracy', f'--out_dir={tmp_path / "out"}'])
    with pytest.raises(SystemExit, match=r"eval_interval=10 must be a multiple of gen_eval_interval=4"):
        train_sft.main(['--best_metric=format', '--gen_eval_data=x.jsonl', '--eval_interval=10',
                        '--gen_eval_interval=4'])
    with pytest.raises(SystemExit, match=r"best_metric='loss': expected one of"):
        train_sft.main(['--best_metric=loss'])
    no_ref = tmp_path / 'noref.jsonl'
    no_ref.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    bad = tmp_path / 'bad.jsonl'
    bad.write_text(no_ref.read_text() + '{oops\n')
    for path, error in ((no_ref, r'noref.jsonl: no conversation has a `reference`'), (bad, r'bad.jsonl:2: invalid JSON'),
                        (tmp_path / 'none.jsonl', r'none.jsonl: cannot read')):
        cfg = tiny_cfg(tmp_path, data_dir=str(data_dir), gen_eval_data=str(path))
        with pytest.raises(SystemExit, match=error):
            train_sft.main(cli_args(cfg))
        assert not (tmp_path / 'out').exists()


def test_help_answers_without_importing_torch_and_shows_values_after_the_config_file(tmp_path):
    import os
    import subprocess
    import sys
    fake = tmp_path / 'torch'
    fake.mkdir()
    (fake / '__init__.py').write_text("raise ImportError('torch was imported by --help')\n")
    root = os.path.dirname(os.path.abspath(train_sft.__file__))
    proc = subprocess.run([sys.executable, 'train_sft.py', 'configs/sft_demo_cpu.py', '--max_iters=7', '--help'],
                          cwd=root, capture_output=True, text=True, timeout=60,
                          env={**os.environ, 'PYTHONPATH': str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    line = {ln.split('=')[0].strip(): ln for ln in proc.stdout.splitlines() if ln.strip().startswith('--')}
    assert "--out_dir='out-demo'" in line['--out_dir']                 # from the config file
    assert '--max_iters=7' in line['--max_iters'] and 'optimizer steps' in line['--max_iters']
    assert 'keep only the newest n' in line['--keep_last_n']


def test_a_jsonl_data_dir_with_a_bad_record_or_no_record_is_a_clear_error(tmp_path):
    import json
    good = json.dumps({'messages': [{'role': 'user', 'content': 'a'}, {'role': 'assistant', 'content': 'b'}]})
    bad, empty = tmp_path / 'bad.jsonl', tmp_path / 'empty.jsonl'
    bad.write_text(good + '\n{"messages": [{"role": "user", "content": 1}]}\n')
    empty.write_text('')
    for path, what in ((bad, ':2: messages[0].content: must be a string, got int'),
                       (empty, ':1: empty file (no records)')):
        with pytest.raises(SystemExit) as e:
            train_sft.main([f'--data_dir={path}', f'--out_dir={tmp_path / "out"}', '--device=cpu'])
        assert e.value.code == f'error: {path}{what}', e.value.code
    assert not (tmp_path / 'out').exists()


def test_architecture_keys_that_disagree_with_a_resumed_model_are_refused_by_name(tmp_path, data_dir):
    cfg = tiny_cfg(tmp_path, data_dir=str(data_dir), max_iters=2, eval_interval=2, n_layer=2)
    train_sft.train(cfg)
    with pytest.raises(train_sft.TrainError, match=r"n_layer=4 \(the model has 2\), n_embd=32 \(the model has "):
        train_sft.build_model(dataclasses.replace(cfg, init_from='resume', n_layer=4, n_embd=32), 'cpu')
    model, *_ = train_sft.build_model(dataclasses.replace(cfg, init_from='resume'), 'cpu')   # same keys: fine
    assert model.config.n_layer == 2


def test_settings_that_train_nothing_on_a_short_run_are_warned_about_once(tmp_path, data_dir, capsys):
    train_sft.train(tiny_cfg(tmp_path, data_dir=str(data_dir), max_iters=3, warmup_iters=100,
                             lr_decay_iters=3000, learning_rate=2e-5, min_lr=2e-6, eval_interval=100))
    out = capsys.readouterr().out
    for text in ('warning: warmup_iters=100 >= max_iters=3', 'warning: lr_decay_iters=3000 differs from max_iters=3',
                 "warning: init_from='scratch' with learning_rate=2e-05"):
        assert out.count(text) == 1, (text, out[:2000])
    capsys.readouterr()
    train_sft.train(tiny_cfg(tmp_path / 'b', data_dir=str(data_dir), max_iters=3, warmup_iters=1,
                             lr_decay_iters=3, eval_interval=100))
    assert 'warning' not in capsys.readouterr().out


@pytest.mark.slow
def test_a_log_redirected_to_a_file_has_whole_lines_with_elapsed_time_and_eta(tmp_path, data_dir):
    import os
    import subprocess
    import sys
    cfg = tiny_cfg(tmp_path, data_dir=str(data_dir), max_iters=6, eval_interval=3, log_interval=2)
    root = os.path.dirname(os.path.abspath(train_sft.__file__))
    with open(tmp_path / 'log.txt', 'w') as log:
        proc = subprocess.run([sys.executable, 'train_sft.py', *cli_args(cfg)], cwd=root, stdout=log,
                              stderr=subprocess.STDOUT, timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    text = (tmp_path / 'log.txt').read_text()
    assert proc.returncode == 0, text[-2000:]
    assert '\r' not in text and '\x1b' not in text          # no progress bar redraws in a file
    lines = text.splitlines()
    assert [ln.split(':')[0] for ln in lines if ln.startswith('eval iter')] == ['eval iter 0', 'eval iter 3',
                                                                                'eval iter 6']
    steps = [ln for ln in lines if ln.startswith('iter ')]
    assert len(steps) == 3 and all('elapsed' in ln for ln in steps) and 'ETA' in steps[0]


def test_missing_data_dir_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match=r"data_dir: directory not found: .*nope"):
        train_sft.main([f'--data_dir={tmp_path / "nope"}', f'--out_dir={tmp_path / "out"}', '--device=cpu'])
    assert not (tmp_path / 'out').exists()


def test_tokenizer_model_mismatch_is_a_clear_error(tmp_path, data_dir):
    cfg = tiny_cfg(tmp_path, data_dir=str(data_dir), vocab_size=50304)
    with pytest.raises(train_sft.TrainError, match=r'tokenizer/model mismatch.* has \d+ tokens .* 50304'):
        train_sft.train(cfg)
    assert not (tmp_path / 'out').exists()
    # the same check for a Hugging Face start (a GPT-2-sized vocabulary under Qwen-tokenized data)
    transformers = pytest.importorskip('transformers')
    hf_cfg = transformers.Qwen3Config(vocab_size=1000, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      head_dim=16, max_position_embeddings=128)
    transformers.Qwen3ForCausalLM(hf_cfg).save_pretrained(tmp_path / 'hf')
    with pytest.raises(SystemExit, match=r'tokenizer/model mismatch.*vocab_size is 1000'):
        train_sft.main([f'--init_from=hf:{tmp_path / "hf"}', f'--data_dir={data_dir}', '--block_size=64',
                        f'--out_dir={tmp_path / "out"}', '--device=cpu'])
    assert not (tmp_path / 'out').exists()


def test_non_finite_steps_are_skipped_then_abort(tmp_path, data_dir, monkeypatch, capsys):
    real = train_sft.forward_backward

    def nan_gradients(model, *a, **k):
        stats = real(model, *a, **k)
        for p in model.parameters():
            p.grad.fill_(float('nan'))
        return stats

    monkeypatch.setattr(train_sft, 'forward_backward', nan_gradients)
    cfg = tiny_cfg(tmp_path, data_dir=str(data_dir), max_iters=10, max_nan_steps=2, batch_size=1)
    with pytest.raises(train_sft.TrainError, match=r'aborting: 2 non-finite steps in a row'):
        train_sft.train(cfg)
    assert 'skipping this step' in capsys.readouterr().out


def test_compute_sft_loss_matches_transformers(tmp_path):
    transformers = pytest.importorskip('transformers')
    from hf_interop import from_hf
    torch.manual_seed(0)
    hf_cfg = transformers.Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=16, max_position_embeddings=128, tie_word_embeddings=True)
    hf = transformers.Qwen3ForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / 'hf')
    ours = from_hf(tmp_path / 'hf').eval()
    ids = torch.randint(0, 512, (3, 24))
    labels = ids.clone()
    labels[:, :10] = -100
    labels[1, 15:] = -100
    labels[2, 3] = -100
    with torch.no_grad():
        ref = hf(input_ids=ids, labels=labels).loss
        got = train_sft.compute_sft_loss(ours, ids, labels)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_two_process_torchrun_matches_one_process_with_double_accumulation(tmp_path, mix_dir):
    import os
    import subprocess
    import sys
    # Adam turns float noise in near-zero gradients into ~lr-sized steps, so a small lr keeps
    # the expected (summation-order) differences under the 1e-5 tolerance.
    # a weighted mixture of two sources: the mixture's order is the same on 1 and 2 ranks too
    common = dict(data_dir=str(mix_dir), max_iters=5, lr_decay_iters=5, eval_interval=100, eval_iters=1,
                  batch_size=2, packing=False, log_interval=5, learning_rate=3e-4, min_lr=3e-5,
                  gen_eval_data=toy_gen_set(tmp_path / 'gen.jsonl', n=9), gen_eval_max_new_tokens=6,
                  gen_eval_batch_size=3)
    one = tiny_cfg(tmp_path / 'one', gradient_accumulation_steps=2, **common)
    two = tiny_cfg(tmp_path / 'two', gradient_accumulation_steps=1, **common)
    args = cli_args(two)
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    root = os.path.dirname(os.path.abspath(train_sft.__file__))
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           os.path.join(root, 'train_sft.py'), *args],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    train_sft.train(one)
    a, b = params_of(tmp_path / 'one' / 'out' / 'ckpt.pt'), params_of(tmp_path / 'two' / 'out' / 'ckpt.pt')
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5, msg=k)
    ck = torch.load(tmp_path / 'two' / 'out' / 'ckpt.pt', weights_only=False)
    assert len(ck['rng']) == 2 and ck['data_state']['global_batch'] == 4
    # the generation evals: each rank replied to its slice (5 and 4 of the 9), counts summed over ranks
    assert 'generation evals: 9 conversations' in proc.stdout
    assert [g[0] for g in gen_metrics(tmp_path / 'two' / 'out')] == [0, 5]
    assert gen_metrics(tmp_path / 'two' / 'out') == gen_metrics(tmp_path / 'one' / 'out')


@pytest.mark.slow
def test_jsonl_data_is_tokenized_on_the_fly_like_the_shards(tmp_path, data_dir):
    from chat_records import load_records
    from sft_data import open_split
    from chat_format import encode_conversation
    from tokenizer import load_tokenizer
    jsonl = data_dir.parent / 'toy.jsonl'
    split = open_split(str(jsonl), 'train')
    records = load_records(str(jsonl))
    assert len(split) == len(records) - len(records) // 20
    ids, labels = encode_conversation(records[0], load_tokenizer('qwen3'))
    assert split[0][0].tolist() == ids and split[0][1].tolist() == labels
    summary = train_sft.train(tiny_cfg(tmp_path, data_dir=str(jsonl), max_iters=2, eval_interval=100))
    assert summary['iters'] == 2
    # under 20 conversations: all train, no val (not the same ones in both)
    few = tmp_path / 'few.jsonl'
    few.write_text(''.join(jsonl.read_text().splitlines(keepends=True)[:19]))
    assert (len(open_split(str(few), 'train')), len(open_split(str(few), 'val'))) == (19, 0)


def torchrun2(cfg):
    import os
    import subprocess
    import sys
    args = cli_args(cfg)
    root = os.path.dirname(os.path.abspath(train_sft.__file__))
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           os.path.join(root, 'train_sft.py'), *args],
                          cwd=root, env={**os.environ, 'OMP_NUM_THREADS': '1'},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


FSDP_COMMON = dict(max_iters=4, lr_decay_iters=4, eval_interval=100, eval_iters=1, batch_size=1,
                   packing=False, log_interval=1, learning_rate=3e-4, min_lr=3e-5)


@pytest.mark.slow
def test_fsdp_matches_one_process_and_saves_a_plain_checkpoint(tmp_path, data_dir):
    from checkpoint import load_checkpoint
    from model_builder import ConfigurableGPT
    from model_config import ModelArchitectureConfig
    # 2 ranks x 2 micro-steps (gradient sync only on the last) vs 1 process x 4 micro-steps: the same
    # global batch, so the same parameters (DDP is checked against the same reference above).
    gen = dict(gen_eval_data=toy_gen_set(tmp_path / 'gen.jsonl', n=5), gen_eval_max_new_tokens=6,
               gen_eval_interval=2)
    fsdp = tiny_cfg(tmp_path / 'fsdp', data_dir=str(data_dir), parallel='fsdp', gradient_accumulation_steps=2,
                    checkpoint_format='file', **FSDP_COMMON, **gen)
    one = tiny_cfg(tmp_path / 'one', data_dir=str(data_dir), gradient_accumulation_steps=4, **FSDP_COMMON, **gen)
    torchrun2(fsdp)
    train_sft.train(one)
    # generation under FSDP: every rank gathers the full weights, replies to its slice, shards again
    assert [g[0] for g in gen_metrics(tmp_path / 'fsdp' / 'out')] == [0, 2, 4]
    assert gen_metrics(tmp_path / 'fsdp' / 'out') == gen_metrics(tmp_path / 'one' / 'out')
    path = tmp_path / 'fsdp' / 'out' / 'ckpt.pt'
    a, b = params_of(tmp_path / 'one' / 'out' / 'ckpt.pt'), params_of(path)
    assert sorted(a) == sorted(b)
    for k in a:
        assert b[k].device.type == 'cpu' and type(b[k]) is torch.Tensor
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5, msg=k)
    model, ck = load_checkpoint(path)
    assert ck['iter_num'] == 4 and len(ck['rng']) == 2
    # The specification's loading snippet.
    ckpt = torch.load(path, map_location='cpu', weights_only=False)
    spec = ConfigurableGPT(ModelArchitectureConfig.from_dict(ckpt['model_args']))
    spec.load_state_dict(ckpt['model'])
    x = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(model(x)[0], spec(x)[0])


@pytest.mark.slow
def test_fsdp_resume_matches_uninterrupted_fsdp_run(tmp_path, data_dir):
    full = tiny_cfg(tmp_path / 'full', data_dir=str(data_dir), parallel='fsdp', gradient_accumulation_steps=2,
                    **FSDP_COMMON)
    torchrun2(full)
    part = dataclasses.replace(full, out_dir=str(tmp_path / 'part' / 'out'), max_iters=2)
    torchrun2(part)
    torchrun2(dataclasses.replace(part, init_from='resume', max_iters=4))
    # under FSDP checkpoints are sharded (checkpoint_format='auto'): each rank saved and restored its part
    assert (tmp_path / 'part' / 'out' / 'ckpt_000002' / '__1_0.distcp').is_file()
    assert_same_state(tmp_path / 'full' / 'out' / 'ckpt.pt', tmp_path / 'part' / 'out' / 'ckpt.pt', 'resumed')


@pytest.mark.slow
def test_checkpoints_of_both_formats_resume_across_world_sizes_and_sharded_ones_bit_exactly(tmp_path, data_dir):
    """One run continued on other world sizes and modes, FSDP x 2 -> DDP x 2 -> one process ->
    FSDP x 2, once with sharded checkpoints and once with one-file ones. DCP reshards each sharded
    checkpoint for the next link, and every link ends bit-identical to its one-file twin (model,
    AdamW state, RNG states, data cursor); the chain ends where an uninterrupted process does."""
    import os
    # the same global batch (4 rows) throughout: 2 ranks x 2 micro-steps or 1 process x 4
    common = dict(FSDP_COMMON, data_dir=str(data_dir), max_iters=5, lr_decay_iters=5)
    links = [(2, 'fsdp', 2), (3, 'ddp', 2), (4, 'ddp', 1), (5, 'fsdp', 2)]   # (stop at, parallel, ranks)
    for fmt in ('sharded', 'file'):
        for n, (it, parallel, ranks) in enumerate(links):
            cfg = tiny_cfg(tmp_path / fmt, checkpoint_format=fmt, init_from='resume' if n else 'scratch',
                           max_iters=it, parallel=parallel, gradient_accumulation_steps=4 // ranks,
                           **{k: v for k, v in common.items() if k != 'max_iters'})
            torchrun2(cfg) if ranks == 2 else train_sft.train(cfg)
    sharded, file = tmp_path / 'sharded' / 'out', tmp_path / 'file' / 'out'
    # the layout: one directory per checkpoint, one file per rank that wrote it, ckpt.pt a link to the newest
    assert sorted(os.listdir(sharded / 'ckpt_000002')) == ['.metadata', '__0_0.distcp', '__1_0.distcp', 'meta.pt']
    assert sorted(os.listdir(sharded / 'ckpt_000004')) == ['.metadata', '__0_0.distcp', 'meta.pt']
    assert os.readlink(sharded / 'ckpt.pt') == 'ckpt_000005' and not list(sharded.glob('.*'))
    # FSDP: each rank wrote about half of the state, nothing gathered (~3% is the metadata)
    assert (sharded / 'ckpt_000002' / '__0_0.distcp').stat().st_size < 0.6 * (file / 'ckpt_000002.pt').stat().st_size
    for it, _, _ in links:
        what = f'iter {it}'
        assert_same_state(sharded / f'ckpt_{it:06d}', file / f'ckpt_{it:06d}.pt', what)
        ms, mf = saved_state(sharded / f'ckpt_{it:06d}')[2], saved_state(file / f'ckpt_{it:06d}.pt')[2]
        assert ms['iter_num'] == mf['iter_num'] == it and ms['data_state'] == mf['data_state'], what
        assert len(ms['rng']) == len(mf['rng']) == (1 if it == 4 else 2)
        for a, b in zip(ms['rng'], mf['rng']):
            assert torch.equal(a['torch'], b['torch']) and a['numpy'] == b['numpy'], what
    ref = tiny_cfg(tmp_path / 'ref', gradient_accumulation_steps=4, **common)
    train_sft.train(ref)
    (mr, orf, _), (ms, osd, _) = saved_state(tmp_path / 'ref' / 'out' / 'ckpt.pt'), saved_state(sharded / 'ckpt.pt')
    for k in mr:
        torch.testing.assert_close(ms[k], mr[k], atol=1e-5, rtol=1e-5, msg=k)
    for k in orf['state']:
        torch.testing.assert_close(osd['state'][k]['exp_avg_sq'], orf['state'][k]['exp_avg_sq'], atol=1e-7, rtol=1e-4)


def free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(('localhost', 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_launched_as_users_do_match_one_process(tmp_path, data_dir):
    """The README's multi-node command on localhost: two torchrun launchers (one per "node", one
    worker each) meet through a c10d rendezvous and train over gloo, with DDP and with FSDP (whose
    sharded checkpoints both nodes write into the shared out_dir): the same parameters as one
    process with twice the accumulation."""
    import os
    import subprocess
    import sys
    common = dict(FSDP_COMMON, data_dir=str(data_dir), batch_size=2)
    one = tiny_cfg(tmp_path / 'one', gradient_accumulation_steps=4, **common)
    train_sft.train(one)
    ref = params_of(tmp_path / 'one' / 'out' / 'ckpt.pt')
    root = os.path.dirname(os.path.abspath(train_sft.__file__))
    for parallel in ('ddp', 'fsdp'):
        cfg = tiny_cfg(tmp_path / parallel, parallel=parallel, gradient_accumulation_steps=2, **common)
        port = free_port()
        # the README's command, with localhost for $MASTER_ADDR and one worker per node
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--nnodes=2', '--nproc_per_node=1',
               '--rdzv_backend=c10d', f'--rdzv_endpoint=localhost:{port}', f'--rdzv_id=sft-{parallel}',
               os.path.join(root, 'train_sft.py'), *cli_args(cfg)]
        nodes = [subprocess.Popen(cmd, cwd=root, env={**os.environ, 'OMP_NUM_THREADS': '1'}, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
        logs = [p.communicate(timeout=300)[0] for p in nodes]
        assert [p.returncode for p in nodes] == [0, 0], '\n'.join(log[-3000:] for log in logs)
        assert sum('world_size=2 global batch=8 rows' in log for log in logs) == 1   # rank 0 prints
        out = tmp_path / parallel / 'out'
        if parallel == 'fsdp':
            assert sorted(os.listdir(out / 'ckpt_000004')) == ['.metadata', '__0_0.distcp', '__1_0.distcp', 'meta.pt']
        got = params_of(out / 'ckpt.pt')
        assert got.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-5, msg=f'{parallel}: {k}')


@pytest.mark.gpu
@pytest.mark.slow
def test_bf16_compiled_cuda_run_follows_the_fp32_cpu_run(tmp_path, data_dir):
    """The GPU path (bf16 autocast, torch.compile, fused AdamW) trains like fp32 eager on CPU."""
    common = dict(data_dir=str(data_dir), max_iters=20, eval_interval=20, eval_iters=2)
    cpu = train_sft.train(tiny_cfg(tmp_path / 'cpu', **common))
    gpu = train_sft.train(tiny_cfg(tmp_path / 'gpu', device='cuda', dtype='bfloat16', compile=True,
                                   **common))
    assert gpu['iters'] == 20 and gpu['skipped_steps'] == 0
    assert gpu['last_val_loss'] == pytest.approx(cpu['last_val_loss'], rel=0.05)
    base = train_sft.train(tiny_cfg(tmp_path / 'base', **dict(common, max_iters=0)))
    assert gpu['last_val_loss'] < 0.8 * base['last_val_loss']  # and it learned


def test_scratch_model_takes_architecture_overrides_on_top_of_the_preset(tmp_path):
    cfg = tiny_cfg(tmp_path, vocab_size=384, n_layer=3, n_embd=96, n_head=6, n_kv_head=2,
                   head_dim=16, intermediate_size=80)
    model, ckpt, _ = train_sft.build_model(cfg, 'cpu')
    c = model.config
    assert ckpt is None
    assert (c.vocab_size, c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.head_dim,
            c.intermediate_size, c.block_size) == (384, 3, 96, 6, 2, 16, 80, 64)
    assert c.qk_norm and c.tie_word_embeddings  # the rest still comes from the 'tiny' preset
    with pytest.raises(train_sft.TrainError, match='bad model config'):
        train_sft.build_model(tiny_cfg(tmp_path, n_embd=96, n_head=5), 'cpu')


def _hf_llama_with_tokenizer(tmp_path, vocab_size=None):
    """A tiny Llama checkpoint directory that ships a Llama-3-style tokenizer (tests/chat_families)."""
    import shutil
    transformers = pytest.importorskip('transformers')
    from family_tokenizers import build_family_dir
    from tokenizer import load_tokenizer
    tok_dir = build_family_dir(tmp_path / 'tok', 'llama3')
    hf_cfg = transformers.LlamaConfig(vocab_size=vocab_size or load_tokenizer(tok_dir).vocab_size,
                                      hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=256)
    transformers.LlamaForCausalLM(hf_cfg).save_pretrained(tmp_path / 'hf')
    for name in ('tokenizer.json', 'tokenizer_config.json', 'generation_config.json'):
        shutil.copyfile(os.path.join(tok_dir, name), tmp_path / 'hf' / name)
    return str(tmp_path / 'hf')


def _llama_jsonl(path, n=40):
    import json
    import random
    from family_tokenizers import random_conversation
    rng = random.Random(0)
    with open(path, 'w') as f:
        for _ in range(n):
            msgs = random_conversation(rng, 'llama3')
            while msgs[0].get('tools') or any(m['role'] == 'tool' for m in msgs):
                msgs = random_conversation(rng, 'llama3')
            f.write(json.dumps({'messages': msgs}, ensure_ascii=False) + '\n')
    return str(path)


def test_hf_start_on_jsonl_data_uses_the_directorys_tokenizer_and_chat_format(tmp_path):
    from chat_format import encode_conversation, get_format
    from sft_data import open_split
    from tokenizer import load_tokenizer
    hf_dir = _hf_llama_with_tokenizer(tmp_path)
    jsonl = _llama_jsonl(tmp_path / 'chat.jsonl')
    cfg = tiny_cfg(tmp_path, init_from=f'hf:{hf_dir}', data_dir=jsonl, block_size=256, max_iters=1,
                   eval_interval=100, eval_iters=1)
    assert cfg.tokenizer == 'auto' and cfg.chat_template == 'auto'
    train_sft.train(cfg)
    ckpt = torch.load(tmp_path / 'out' / 'ckpt.pt', map_location='cpu', weights_only=False)
    tok_meta = ckpt['tokenizer']
    assert tok_meta['name'] == hf_dir and tok_meta['chat_format']['name'] == 'llama3'
    tok = load_tokenizer(hf_dir)
    assert tok_meta['chat_format']['stop_ids'] == list(get_format('llama3', tok).stop_ids)
    split = open_split(jsonl, 'train', hf_dir)
    from chat_records import load_records
    assert split[0][0].tolist() == encode_conversation(load_records(jsonl)[0], tok, chat_template='llama3')[0]


def test_hf_start_whose_vocabulary_the_tokenizer_overflows_fails_before_tokenizing(tmp_path, monkeypatch):
    import sft_data
    hf_dir = _hf_llama_with_tokenizer(tmp_path, vocab_size=100)
    jsonl = _llama_jsonl(tmp_path / 'chat.jsonl', n=2)

    def no_work(*a, **k):
        raise AssertionError('the data was tokenized before the vocabulary check')
    monkeypatch.setattr(sft_data, 'JsonlSplit', no_work)
    with pytest.raises(train_sft.TrainError, match=r'tokenizer/model mismatch: tokenizer .* has \d+ tokens '
                                                    r'but .* has vocab_size 100'):
        train_sft.train(tiny_cfg(tmp_path, init_from=f'hf:{hf_dir}', data_dir=jsonl))
    assert not (tmp_path / 'out').exists()


# ---------------------------------------------------------------- LoRA / QLoRA (lora.py)

@pytest.fixture(scope='module')
def base_ckpt(tmp_path_factory, data_dir):
    """A base model to adapt: the tiny model as a 0-step run writes it (random, but frozen it is a base)."""
    d = tmp_path_factory.mktemp('base')
    train_sft.train(tiny_cfg(d, data_dir=str(data_dir), max_iters=0))
    return d / 'out' / 'ckpt.pt'


def lora_cfg(tmp_path, data_dir, base_ckpt, **over):
    cfg = dict(data_dir=str(data_dir), init_from=str(base_ckpt), finetune='lora', lora_rank=4,
               lora_alpha=8.0, learning_rate=1e-2, max_iters=4, lr_decay_iters=4, eval_interval=2)
    return tiny_cfg(tmp_path, **{**cfg, **over})


@pytest.mark.slow
@pytest.mark.parametrize('finetune,base_dtype,dtype', [('lora', 'auto', 'float32'), ('qlora', 'auto', 'float32'),
                                                       ('lora', 'bfloat16', 'float32'), ('lora', 'auto', 'bfloat16')])
def test_lora_checkpoint_holds_adapters_and_the_base_fingerprint_not_the_base(tmp_path, data_dir, base_ckpt, capsys,
                                                                             finetune, base_dtype, dtype):
    from checkpoint import load_checkpoint
    from lora import base_fingerprint, lora_modules
    summary = train_sft.train(lora_cfg(tmp_path, data_dir, base_ckpt, finetune=finetune, lora_dora=True,
                                       lora_base_dtype=base_dtype, dtype=dtype))
    assert summary['iters'] == 4 and summary['skipped_steps'] == 0
    ck = torch.load(tmp_path / 'out' / 'ckpt.pt', weights_only=False)
    base, _ = load_checkpoint(base_ckpt)
    assert ck['base']['source'] == str(base_ckpt) and ck['base']['sha256'] == base_fingerprint(base)['sha256']
    assert ck['lora']['quantize'] == (finetune == 'qlora') and ck['lora']['dora']
    # adapters (A, B, magnitude) of 7 projections x 2 layers, nothing of the base; AdamW holds them alone
    assert len(ck['model']) == 42 and all('.lora_' in k for k in ck['model'])
    assert sorted(ck['optimizer']['state']) == sorted(ck['model'])
    assert (tmp_path / 'out' / 'ckpt.pt').stat().st_size < base_ckpt.stat().st_size / 20
    model, _ = load_checkpoint(tmp_path / 'out' / 'ckpt.pt')
    assert len(lora_modules(model)) == 8 and model.lora_config.quantize == (finetune == 'qlora')
    # 'auto' keeps the fp32 base in fp32 training and holds it in bf16 under bf16 autocast (the
    # embedding too); asked for, the frozen projections come back in bf16
    held = 'bfloat16' if 'bfloat16' in (base_dtype, dtype) else 'float32'
    assert ck['lora']['base_dtype'] == model.lora_config.base_dtype == held
    embedding = 'bfloat16' if dtype == 'bfloat16' else 'float32'
    assert f"frozen projections in {'nf4' if finetune == 'qlora' else held}, embedding in {embedding}" in \
        capsys.readouterr().out
    if finetune == 'lora':
        assert {str(m.weight.dtype) for m in lora_modules(model).values()} == {f'torch.{held}'}
    moved = [n for n, p in model.named_parameters() if '.lora_B.' in n and p.abs().sum() > 0]
    assert len(moved) == 14   # every B left zero: the adapters trained


@pytest.mark.slow
@pytest.mark.parametrize('finetune', ['lora', 'qlora', 'qlora_embeddings'])
def test_lora_resume_after_sigterm_matches_uninterrupted_run(tmp_path, data_dir, base_ckpt, monkeypatch,
                                                             finetune):
    import os
    import signal
    common = dict(max_iters=6, lr_decay_iters=6, eval_interval=3, batch_size=2, gradient_accumulation_steps=2,
                  packing=True, lora_dropout=0.1, finetune=finetune.removesuffix('_embeddings'),
                  lora_quantize_embeddings=finetune.endswith('_embeddings'))
    train_sft.train(lora_cfg(tmp_path / 'a', data_dir, base_ckpt, **common))
    interrupted = lora_cfg(tmp_path / 'b', data_dir, base_ckpt, **common)
    real_get_lr = train_sft.get_lr

    def get_lr_then_sigterm(it, cfg):
        if it == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_get_lr(it, cfg)

    monkeypatch.setattr(train_sft, 'get_lr', get_lr_then_sigterm)
    assert train_sft.train(interrupted)['iters'] == 2
    monkeypatch.setattr(train_sft, 'get_lr', real_get_lr)
    train_sft.train(dataclasses.replace(interrupted, init_from='resume'))
    a = torch.load(tmp_path / 'a' / 'out' / 'ckpt.pt', weights_only=False)
    b = torch.load(tmp_path / 'b' / 'out' / 'ckpt.pt', weights_only=False)
    assert a['model'].keys() == b['model'].keys() and b['iter_num'] == 6
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    for k in a['optimizer']['state']:
        assert torch.equal(a['optimizer']['state'][k]['exp_avg_sq'], b['optimizer']['state'][k]['exp_avg_sq'])


@pytest.mark.slow
def test_lora_on_two_ranks_matches_one_process(tmp_path, data_dir, base_ckpt):
    """DDP with LoRA and with QLoRA + an NF4 embedding table, FSDP with QLoRA (the frozen NF4 base
    sharded too), FSDP with a bf16-held base in fp32 math and under bf16 autocast (embedding
    included), on 2 gloo ranks x 2 micro-steps end where 1 process x 4 micro-steps does."""
    # FSDP shards each NF4 weight with whole groups of 256 x 64 weights per rank: a wider base
    wide = tmp_path / 'wide'
    train_sft.train(tiny_cfg(wide, data_dir=str(data_dir), max_iters=0, n_embd=256, n_head=4, head_dim=64,
                             intermediate_size=256))
    common = dict(max_iters=3, lr_decay_iters=3, eval_interval=100, eval_iters=1, batch_size=1,
                  packing=False, log_interval=3, learning_rate=3e-3, min_lr=3e-4)
    for name, base, extra in (('ddp_lora', base_ckpt, dict(finetune='lora', lora_dora=True)),
                              # the NF4 table replicated by DDP (broadcast at wrap), read by rows
                              ('ddp_qlora_embeddings', base_ckpt,
                               dict(finetune='qlora', lora_quantize_embeddings=True)),
                              ('fsdp_qlora', wide / 'out' / 'ckpt.pt', dict(finetune='qlora', parallel='fsdp')),
                              ('fsdp_lora_bf16_base', base_ckpt, dict(finetune='lora', parallel='fsdp',
                                                                      lora_base_dtype='bfloat16')),
                              # under bf16 autocast: projections, embedding and head held in bf16
                              ('fsdp_lora_bf16_autocast', base_ckpt, dict(finetune='lora', parallel='fsdp',
                                                                          dtype='bfloat16'))):
        torchrun2(lora_cfg(tmp_path / name / '2', data_dir, base, gradient_accumulation_steps=2, **common, **extra))
        train_sft.train(lora_cfg(tmp_path / name / '1', data_dir, base, gradient_accumulation_steps=4, **common,
                                 **dict(extra, parallel='ddp')))
        a, b = (torch.load(tmp_path / name / n / 'out' / 'ckpt.pt', weights_only=False) for n in '12')
        assert sorted(a['model']) == sorted(b['model']) and len(b['rng']) == 2, name
        for k in a['model']:
            torch.testing.assert_close(a['model'][k], b['model'][k], atol=1e-5, rtol=1e-5, msg=f'{name}: {k}')


@pytest.mark.slow
def test_lora_against_another_base_is_a_clear_error(tmp_path, data_dir, base_ckpt):
    train_sft.train(lora_cfg(tmp_path / 'run', data_dir, base_ckpt, max_iters=2, eval_interval=2))
    other = tmp_path / 'other'
    train_sft.train(tiny_cfg(other, data_dir=str(data_dir), max_iters=0, seed=7))
    resume = lora_cfg(tmp_path / 'run', data_dir, base_ckpt, init_from='resume', max_iters=4,
                      lora_base=str(other / 'out' / 'ckpt.pt'))
    with pytest.raises(train_sft.TrainError, match=rf"trained on the base {base_ckpt} \(sha256 [0-9a-f]{{16}}\), "
                                                   rf"but {other / 'out' / 'ckpt.pt'} is a different base"):
        train_sft.train(resume)
    import export_hf
    with pytest.raises(SystemExit, match='is a different base'):
        export_hf.main([str(tmp_path / 'run' / 'out' / 'ckpt.pt'), str(tmp_path / 'hf'),
                        '--base', str(other / 'out' / 'ckpt.pt')])
    assert not (tmp_path / 'hf').exists()


@pytest.mark.slow
def test_lora_run_continues_from_a_peft_adapter_dir_and_merges_for_full_finetuning(tmp_path, data_dir, base_ckpt):
    import export_hf
    first = train_sft.train(lora_cfg(tmp_path / 'run', data_dir, base_ckpt, lora_dora=True, lora_targets='q_proj,v_proj'))
    export_hf.main([str(tmp_path / 'run' / 'out' / 'ckpt.pt'), str(tmp_path / 'adapter'), '--peft'])
    # the adapter directory, onto its base: the same model (same val loss), its rank / targets kept
    cont = train_sft.train(lora_cfg(tmp_path / 'cont', data_dir, base_ckpt, init_from=str(tmp_path / 'adapter'),
                                    lora_base=str(base_ckpt), eval_only=True))
    assert cont['last_val_loss'] == pytest.approx(first['last_val_loss'], abs=1e-5)
    # a LoRA checkpoint as the start of full fine-tuning: its merged model
    full = train_sft.train(tiny_cfg(tmp_path / 'full', data_dir=str(data_dir), eval_only=True,
                                    init_from=str(tmp_path / 'run' / 'out' / 'ckpt.pt')))
    assert full['last_val_loss'] == pytest.approx(first['last_val_loss'], abs=1e-4)


def test_lora_non_finite_steps_are_skipped_then_abort(tmp_path, data_dir, base_ckpt, monkeypatch, capsys):
    real = train_sft.forward_backward

    def nan_gradients(model, *a, **k):
        stats = real(model, *a, **k)
        for p in model.parameters():
            if p.requires_grad:
                p.grad.fill_(float('nan'))
        return stats

    monkeypatch.setattr(train_sft, 'forward_backward', nan_gradients)
    with pytest.raises(train_sft.TrainError, match=r'aborting: 2 non-finite steps in a row'):
        train_sft.train(lora_cfg(tmp_path, data_dir, base_ckpt, max_nan_steps=2, batch_size=1))
    assert 'skipping this step' in capsys.readouterr().out


def test_mfu_of_a_lora_run_leaves_out_the_frozen_weights_gradients():
    """A frozen weight has no weight gradient: a LoRA step computes ~2/3 of full fine-tuning's FLOPs,
    and its MFU must not count the rest. The formula's LoRA / full ratio against torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode
    from lora import LoRAConfig, apply_lora
    from model_builder import ConfigurableGPT
    from model_config import ModelArchitectureConfig
    T, ratios = 64, {}
    for targets in (None, ('all',), ('all', 'lm_head')):
        torch.manual_seed(0)
        model = ConfigurableGPT(ModelArchitectureConfig.from_preset(
            'tiny', vocab_size=512, n_embd=128, n_head=4, head_dim=32, intermediate_size=384))
        if targets:
            model = apply_lora(model, LoRAConfig(rank=4, targets=targets))
        ids = torch.randint(1, 500, (1, T))
        with FlopCounterMode(display=False) as counter:
            model(ids, labels=ids)[1].backward()
        # the formula's attention term left out: torch's counter does not count SDPA's CPU kernel
        c = model.config
        attention = 12 * c.n_layer * c.n_head * c.head_size * T
        ratios[targets] = (train_sft.train_flops_per_token(model, T) - attention, counter.get_total_flops() / T)
    full = ratios.pop(None)
    assert full[0] == pytest.approx(full[1], rel=0.01)
    for targets, (formula, counted) in ratios.items():
        # within 4%: the fused adapters' block-diagonal B also multiplies zeros (~3% of this tiny
        # model's LoRA step), and with a frozen embedding autograd skips block 0's input gradient
        assert formula / full[0] == pytest.approx(counted / full[1], rel=0.04), targets
        assert formula / full[0] < 0.8


def test_peak_flops_follow_the_gpu_and_the_precision(monkeypatch):
    for name, bf16 in (('NVIDIA H100 80GB HBM3', 989e12), ('NVIDIA H100 PCIe', 756e12),
                       ('NVIDIA H200', 989e12), ('NVIDIA A100-SXM4-80GB', 312e12)):
        monkeypatch.setattr(torch.cuda, 'get_device_name', lambda *a, n=name: n)
        assert train_sft.guess_peak_flops('cuda', 'bfloat16') == bf16
        assert train_sft.guess_peak_flops('cuda', 'float32') == bf16 / 2     # TF32 tensor cores
    assert train_sft.guess_peak_flops('cpu', 'bfloat16') == 0.0


def test_qlora_under_fsdp_needs_two_ranks_and_whole_nf4_groups_on_each():
    from lora import LoRAConfig, apply_lora
    from model_builder import ConfigurableGPT
    from model_config import ModelArchitectureConfig
    model = apply_lora(ConfigurableGPT(ModelArchitectureConfig.from_preset(
        'tiny', vocab_size=512, n_embd=256, n_head=4, head_dim=64, intermediate_size=256)),
        LoRAConfig(rank=4, quantize=True))
    train_sft.check_nf4_shardable(model, 2)
    with pytest.raises(train_sft.TrainError, match=r"on 1 rank: .* use parallel='ddp'"):
        train_sft.check_nf4_shardable(model, 1)
    with pytest.raises(train_sft.TrainError, match=r"on 3 ranks: transformer\.h\.0\..* not divisible by 3"):
        train_sft.check_nf4_shardable(model, 3)


def test_bad_lora_settings_are_clear_errors_before_training(tmp_path, data_dir, base_ckpt):
    cases = [
        (dict(init_from='scratch'), r"finetune='lora' adapts a trained base"),
        (dict(finetune='qlora', dtype='float16'), 'QLoRA with dtype float16 on CPU'),
        (dict(lora_targets='q_proj,qkv_proj'), r"unknown LoRA target 'qkv_proj'.*'q_proj', 'k_proj'"),
        (dict(lora_rank=0), 'rank must be an integer >= 1'),
        (dict(lora_quantize_embeddings=True), r"quantize_embeddings .* needs QLoRA"),
        (dict(finetune='qlora', lora_quantize_embeddings=True, parallel='fsdp'), 'NF4 embedding table is not sharded'),
        (dict(lora_base=str(base_ckpt), init_from=f'hf:{tmp_path}'), 'lora_base=.* names the base of'),
        (dict(init_from=str(tmp_path / 'no.pt')), 'checkpoint not found'),
    ]
    for over, msg in cases:
        with pytest.raises(train_sft.TrainError, match=msg):
            train_sft.train(lora_cfg(tmp_path, data_dir, base_ckpt, **over))
        assert not (tmp_path / 'out').exists()
    with pytest.raises(SystemExit, match=r"finetune='lorra': expected one of \('full', 'lora', 'qlora'\)"):
        train_sft.main(['--finetune=lorra'])
    (tmp_path / 'adapter').mkdir()
    (tmp_path / 'adapter' / 'adapter_config.json').write_text('{}')
    with pytest.raises(train_sft.TrainError, match='lora_base= must name its base'):
        train_sft.train(lora_cfg(tmp_path, data_dir, base_ckpt, init_from=str(tmp_path / 'adapter')))


@pytest.mark.slow
@pytest.mark.parametrize('parallel', ['ddp', 'fsdp'])
def test_checkpointed_per_document_attention_under_torchrun_trains_like_the_dense_mask(tmp_path, data_dir,
                                                                                        parallel):
    """Packed rows: 2 ranks with per-document attention and activation checkpointing (full under
    FSDP2, selective under DDP) end with the parameters of one process on the dense mask without."""
    packed = dict(FSDP_COMMON, packing=True, data_dir=str(data_dir), max_iters=2, lr_decay_iters=2)
    ac = 'full' if parallel == 'fsdp' else 'selective'
    two = tiny_cfg(tmp_path / 'two', parallel=parallel, gradient_accumulation_steps=2, attention='per_doc',
                   activation_checkpointing=ac, activation_checkpointing_every=2, **packed)
    one = tiny_cfg(tmp_path / 'one', gradient_accumulation_steps=4, attention='dense', **packed)
    log = torchrun2(two).stdout
    assert f"attention: per_doc (as configured), packed rows of 64; activation checkpointing: {ac}" in log
    train_sft.train(one)
    a, b = params_of(tmp_path / 'one' / 'out' / 'ckpt.pt'), params_of(tmp_path / 'two' / 'out' / 'ckpt.pt')
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5, msg=k)


def test_attention_and_activation_checkpointing_keys_reach_the_model_and_are_checked(tmp_path):
    model, *_ = train_sft.build_model(tiny_cfg(tmp_path, attention='per_doc', activation_checkpointing='selective',
                                              activation_checkpointing_every=3), 'cpu')
    assert model.config.attention == 'per_doc' and model.checkpoint_every == 3
    with pytest.raises(ConfigError, match="attention='flash'"):
        tiny_cfg(tmp_path, attention='flash')
    with pytest.raises(ConfigError, match='activation_checkpointing_every=0'):
        tiny_cfg(tmp_path, activation_checkpointing_every=0)
