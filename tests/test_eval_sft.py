import json
import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from checkpoint import save_checkpoint  # noqa: E402
from gen_eval import load_eval_records  # noqa: E402
from model_builder import ConfigurableGPT  # noqa: E402
from model_config import ModelArchitectureConfig  # noqa: E402
from chat_format import encode_conversation  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402
import eval_sft  # noqa: E402
from test_gen_eval import CONVS  # noqa: E402  (the same three held-out conversations)


def tiny_checkpoint(path, seed):
    torch.manual_seed(seed)
    cfg = ModelArchitectureConfig.from_preset('tiny')
    model = ConfigurableGPT(cfg)
    save_checkpoint(path, {'model': model.state_dict(), 'model_args': cfg.to_dict(), 'iter_num': 0,
                           'config': {}, 'tokenizer': load_tokenizer('qwen3').meta()})
    return model


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp('eval')
    models = [tiny_checkpoint(d / f'm{s}.pt', s) for s in (0, 1)]
    data = d / 'test.jsonl'
    data.write_text(''.join(json.dumps(c) + '\n' for c in CONVS))
    return d, models, data


def test_loss_is_token_weighted_over_the_file_with_training_masks(setup):
    d, (model, _), data = setup
    model.eval()
    tok = load_tokenizer('qwen3')
    total = count = 0
    with torch.no_grad():
        for c in CONVS:  # one conversation at a time: no padding can leak into the number
            ids, labels = encode_conversation(c['messages'], tok)
            _, loss = model(torch.tensor([ids]), labels=torch.tensor([labels]), reduction='sum')
            total += float(loss)
            count += sum(l != -100 for l in labels[1:])
    recs = load_eval_records(str(data))
    s, n, _ = eval_sft.masked_loss(model, tok, recs, 'chatml', batch_size=3, device='cpu')
    assert n == count and s / n == pytest.approx(total / count, rel=1e-5)


@pytest.mark.slow
def test_cli_writes_json_and_one_table_row_per_checkpoint(setup, capsys):
    d, _, data = setup
    out = d / 'eval.json'
    eval_sft.main([str(data), str(d / 'm0.pt'), str(d / 'm1.pt'), '--labels', 'base', 'sft',
                   '--out', str(out), '--max_new_tokens', '4', '--batch_size', '2'])
    table = capsys.readouterr().out
    assert '| base |' in table and '| sft |' in table
    rep = json.loads(out.read_text())
    assert [r['label'] for r in rep['results']] == ['base', 'sft']
    for r in rep['results']:
        assert r['n'] == 3 and r['n_with_reference'] == 2
        assert math.isclose(r['perplexity'], math.exp(r['val_loss']), rel_tol=1e-6)
        assert 0 <= r['format_compliance'] <= 1 and 0 <= r['accuracy'] <= 1


def test_compliance_and_accuracy_scoring(monkeypatch, setup):
    d, _, data = setup
    fake = [('4', True, False), ('{"answer":  6}', False, False), ('3 2 1', True, False)]
    monkeypatch.setattr(eval_sft, 'generate_replies', lambda *a, **k: fake)

    class A:
        device, tokenizer, batch_size, max_new_tokens, n_samples = 'cpu', None, 8, 4, 2
    r = eval_sft.evaluate(str(d / 'm0.pt'), load_eval_records(str(data)), A, 'x')
    assert r['format_compliance'] == pytest.approx(2 / 3)
    assert r['accuracy'] == 1.0  # whitespace-normalized exact match
    assert r['accuracy_per_task'] == {'add': 1.0, 'followup': 1.0}
    assert r['cut_off'] == 0 and r['max_new_tokens'] == 4


def test_replies_cut_off_by_the_limit_are_counted_scored_wrong_and_warned_about(monkeypatch, setup,
                                                                                tmp_path, capsys):
    d, _, _ = setup
    gsm = tmp_path / 'gsm.jsonl'
    gsm.write_text(''.join(json.dumps({'question': f'q{i}?', 'answer': '2 + 3 = 5\n#### 5'}) + '\n'
                           for i in range(4)))
    # three replies stopped by the limit mid-reasoning (their last number happens to be the answer)
    fake = [('2 + 3 = 5', False, True)] * 3 + [('2 + 3 = 5 #### 5', True, False)]
    monkeypatch.setattr(eval_sft, 'generate_replies', lambda *a, **k: fake)

    class A:
        device, tokenizer, batch_size, max_new_tokens, n_samples = 'cpu', None, 8, 4, 4
    r = eval_sft.evaluate(str(d / 'm0.pt'), load_eval_records(str(gsm)), A, 'x')
    assert r['cut_off'] == 0.75 and r['accuracy'] == 0.25 and r['format_compliance'] == 0.25
    assert 'warning: 3 of 4 replies reached --max_new_tokens 4' in capsys.readouterr().err
    assert '| cut off |' in eval_sft.markdown_table([r]) and '75.0%' in eval_sft.markdown_table([r])


def test_bad_input_is_a_clear_error_naming_file_and_line(setup, tmp_path):
    d, _, _ = setup
    p = tmp_path / 'bad.jsonl'
    p.write_text(json.dumps(CONVS[0]) + '\n{oops\n')
    with pytest.raises(SystemExit, match=r'bad.jsonl:2'):
        eval_sft.main([str(p), str(d / 'm0.pt')])


def test_lora_checkpoint_is_evaluated_as_its_adapter_model_and_finds_a_moved_base(setup, tmp_path):
    import shutil

    from lora import LoRAConfig, adapter_state_dict, apply_lora, base_fingerprint
    d, (base, _), data = setup
    shutil.copy(d / 'm0.pt', tmp_path / 'base.pt')
    cfg = LoRAConfig(rank=4, quantize=True, dora=True)
    model = apply_lora(tiny_checkpoint(tmp_path / 'unused.pt', 0), cfg)
    record = {'source': str(tmp_path / 'base.pt'), **base_fingerprint(base)}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    save_checkpoint(tmp_path / 'lora.pt', {'model': adapter_state_dict(model), 'model_args': base.config.to_dict(),
                                           'lora': cfg.to_dict(), 'base': record, 'iter_num': 3, 'config': {},
                                           'tokenizer': load_tokenizer('qwen3').meta()})
    tok, recs = load_tokenizer('qwen3'), load_eval_records(str(data))
    want = eval_sft.masked_loss(model.eval(), tok, recs, 'chatml', batch_size=3, device='cpu')
    import types
    args = types.SimpleNamespace(device='cpu', tokenizer=None, base=None, max_new_tokens=2, batch_size=3,
                                 n_samples=0)
    got = eval_sft.evaluate(str(tmp_path / 'lora.pt'), recs, args)
    assert got['val_loss'] == pytest.approx(want[0] / want[1], rel=1e-5)
    shutil.move(tmp_path / 'base.pt', tmp_path / 'moved.pt')
    with pytest.raises(SystemExit, match=r'base .*base.pt: not found \(moved\? .*--base\)'):
        eval_sft.evaluate(str(tmp_path / 'lora.pt'), recs, args)
    args.base = str(tmp_path / 'moved.pt')
    assert eval_sft.evaluate(str(tmp_path / 'lora.pt'), recs, args)['val_loss'] == got['val_loss']


def test_swapped_arguments_name_the_checkpoint_as_binary_not_a_traceback(setup):
    d, _, data = setup
    with pytest.raises(SystemExit, match=r'm0.pt: not a JSONL/JSON text file \(binary data: is it a checkpoint'):
        eval_sft.main([str(d / 'm0.pt'), str(data)])


@pytest.mark.parametrize('out', ['{tmp}', '{tmp}/new/', '{data}/eval.json'])
def test_out_that_cannot_be_a_file_is_refused_before_evaluating(setup, tmp_path, monkeypatch, out):
    d, _, data = setup
    monkeypatch.setattr(eval_sft, 'evaluate', lambda *a, **k: pytest.fail('evaluated before --out was checked'))
    out = out.format(tmp=tmp_path, data=data)
    with pytest.raises(SystemExit, match=rf'--out {out}: (names a directory|cannot write there)'):
        eval_sft.main([str(data), str(d / 'm0.pt'), '--out', out])
    assert os.listdir(tmp_path) == []


def test_failed_report_write_leaves_no_temporary_file(tmp_path):
    with pytest.raises(TypeError):
        eval_sft.write_json(str(tmp_path / 'eval.json'), {'x': object()})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('flag', ['--batch_size', '--max_new_tokens'])
def test_batch_size_or_reply_limit_below_one_is_a_clear_error(setup, flag):
    d, _, data = setup
    with pytest.raises(SystemExit, match=f'{flag} must be >= 1'):
        eval_sft.main([str(data), str(d / 'm0.pt'), flag, '-3'])


@pytest.mark.parametrize('device, error', [('cuda', "device='cuda': CUDA is not available here"),
                                           ('gpu', "device='gpu': expected cpu, cuda, cuda:N, mps")])
def test_device_not_here_is_a_clear_error_before_loading(setup, tmp_path, monkeypatch, device, error):
    _, _, data = setup
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(SystemExit, match=error):   # before the missing checkpoint is noticed
        eval_sft.main([str(data), str(tmp_path / 'nope.pt'), '--device', device])
