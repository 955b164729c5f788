"""`make demo` in miniature: the Makefile's own recipe, with a small data set and a few steps, so CI
catches a broken step of the user's first command (data, tokenizer, shards, base model, sampling,
fine-tuning, evaluation, plot)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    if shutil.which('make') is None:
        pytest.skip('make is not installed')
    pytest.importorskip('matplotlib')
    tmp = tmp_path_factory.mktemp('demo')
    # the recipe depends on the venv stamps: fake ones (newer than the requirements) skip the install
    venv = tmp / 'venv'
    venv.mkdir()
    (venv / '.installed').touch()
    (venv / '.installed-dev').touch()
    cmd = ['make', '--no-print-directory', 'demo', f'VENV={venv}', f'PY={sys.executable}',
           f'DEMO_DATA={tmp / "data"}', f'DEMO_OUT={tmp / "out"}',
           'DEMO_DATA_ARGS=--n_train 400 --n_test 24',
           'DEMO_TRAIN_ARGS=--max_iters=40 --lr_decay_iters=40 --warmup_iters=4 --eval_interval=20 '
           '--eval_iters=2 --batch_size=4 --log_interval=10']
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f'make demo failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}'
    return tmp, proc


@pytest.mark.slow
def test_make_demo_writes_data_tokenizer_shards_checkpoints_eval_and_plot(demo):
    tmp, _ = demo
    for rel in ('data/train.jsonl', 'data/test.jsonl', 'data/tokenizer/tokenizer.json',
                'data/sft/meta.json', 'out/base/ckpt.pt', 'out/ckpt.pt', 'out/eval.json'):
        assert (tmp / rel).is_file(), rel
    meta = json.loads((tmp / 'data/sft/meta.json').read_text())
    assert meta['tokenizer']['vocab_size'] <= 384  # the demo's own small tokenizer, not Qwen's
    # generation evals on the held-out set during training, for the plot's accuracy curve
    (run,) = (tmp / 'out').glob('run_*.json')
    gen = [e for e in json.loads(run.read_text())['evals'] if 'accuracy' in e]
    assert [e['iter'] for e in gen] == [0, 40] and all(e['with_reference'] == 24 for e in gen)
    with open(tmp / 'out/loss.png', 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'


@pytest.mark.slow
def test_make_demo_prints_audit_examples_samples_and_the_before_after_table(demo):
    _, proc = demo
    out = proc.stdout + proc.stderr
    assert 'assistant turns ending in <|im_end|>' in out          # prepare_sft's audit
    assert out.count('What is 3 + 4?') >= 2                        # base and fine-tuned replies
    assert '| model | val loss | perplexity | format compliance | accuracy |' in proc.stdout
    assert '| base |' in proc.stdout and '| sft |' in proc.stdout


@pytest.mark.slow
def test_fine_tuning_in_the_demo_beats_the_base_model_on_held_out_loss(demo):
    tmp, _ = demo
    base, sft = json.loads((tmp / 'out/eval.json').read_text())['results']
    assert (base['label'], sft['label']) == ('base', 'sft')
    assert base['n'] == sft['n'] == 24
    # 40 steps from a random init (val loss ~ln 384 = 5.95) on a 400-conversation set
    assert sft['val_loss'] < base['val_loss'] - 1.5


@pytest.mark.slow
def test_demo_checkpoint_exports_with_its_own_tokenizer_and_chat_template(demo):
    """The demo's tokenizer is a local HF directory (not Qwen's): export must ship it with a chat
    template that renders our training tokens, and transformers must give our logits."""
    import torch
    import transformers

    import export_hf
    from checkpoint import load_checkpoint
    from chat_format import encode_conversation
    from tokenizer import load_tokenizer
    tmp, _ = demo
    out = export_hf.export(str(tmp / 'out/ckpt.pt'), str(tmp / 'hf'))
    conv = [{'role': 'system', 'content': 'Answer with a word.'},
            {'role': 'user', 'content': 'What is 3 + 4?'}, {'role': 'assistant', 'content': 'seven'},
            {'role': 'user', 'content': 'And double that?'}, {'role': 'assistant', 'content': 'fourteen'}]
    ours, _ = encode_conversation(conv, load_tokenizer(str(tmp / 'data/tokenizer')))
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert list(hf_tok.apply_chat_template(conv, tokenize=True, return_dict=False)) == ours
    model, _ = load_checkpoint(str(tmp / 'out/ckpt.pt'), device='cpu')
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    ids = torch.tensor([ours])
    with torch.no_grad():
        assert (model.eval()(ids)[0] - hf(ids).logits).abs().max() < 1e-4
