import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from checkpoint import save_checkpoint  # noqa: E402
from model_builder import ConfigurableGPT  # noqa: E402
from model_config import ModelArchitectureConfig  # noqa: E402
from chat_format import encode_prompt  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402
import sample_sft  # noqa: E402


def tiny_checkpoint(path, seed=0):
    torch.manual_seed(seed)
    cfg = ModelArchitectureConfig.from_preset('tiny')
    model = ConfigurableGPT(cfg)
    tok = load_tokenizer('qwen3')
    save_checkpoint(path, {'model': model.state_dict(), 'model_args': cfg.to_dict(), 'iter_num': 0,
                           'config': {'chat_template': 'chatml'}, 'tokenizer': tok.meta()})
    return str(path)


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp('ckpt') / 'ckpt.pt')


def cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'sample_sft.py'), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.mark.slow
def test_one_shot_prompt_streams_the_same_greedy_reply_as_generate(ckpt):
    r = cli(ckpt, '--prompt', 'What is 2 + 2?', '--system', 'Be brief.', '--max_new_tokens', '6')
    assert r.returncode == 0, r.stderr
    model, tok, tmpl = sample_sft.load_model(ckpt)
    prompt = encode_prompt([{'role': 'system', 'content': 'Be brief.'},
                            {'role': 'user', 'content': 'What is 2 + 2?'}], tok)
    new = model.generate([prompt], max_new_tokens=6, temperature=0.0,
                         stop_ids=sample_sft.stop_ids(tok))[0]
    want = tok.decode([t for t in new if t not in sample_sft.stop_ids(tok)])
    assert r.stdout == want + '\n'


def test_sampling_options_are_seeded_and_no_stream_prints_the_same(ckpt, capsys):
    args = [ckpt, '--prompt', 'hi', '--temperature', '1.0', '--top_k', '50', '--top_p', '0.9',
            '--max_new_tokens', '5', '--seed', '3']
    outs = []
    for extra in ([], [], ['--no_stream']):
        sample_sft.main(args + extra)
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] == outs[2] and outs[0].strip()


def test_missing_checkpoint_and_bad_options_are_clear_errors(tmp_path, ckpt):
    with pytest.raises(SystemExit, match='nope.pt'):
        sample_sft.main([str(tmp_path / 'nope.pt'), '--prompt', 'x'])
    (tmp_path / 'junk.pt').write_bytes(b'not a checkpoint')
    with pytest.raises(SystemExit, match='junk.pt'):
        sample_sft.main([str(tmp_path / 'junk.pt'), '--prompt', 'x'])
    with pytest.raises(SystemExit, match='top_p'):
        sample_sft.main([ckpt, '--prompt', 'x', '--top_p', '1.5'])


def test_history_that_does_not_fit_drops_oldest_turns_but_keeps_system():
    tok = load_tokenizer('qwen3')
    msgs = [{'role': 'system', 'content': 'S'}]
    for i in range(20):
        msgs += [{'role': 'user', 'content': f'question {i} ' * 5},
                 {'role': 'assistant', 'content': f'answer {i}'}]
    msgs.append({'role': 'user', 'content': 'last'})
    kept, ids = sample_sft.fit_history(msgs, tok, 'chatml', budget=60)
    assert len(ids) <= 60 and kept[0]['role'] == 'system' and kept[1]['role'] == 'user'
    assert kept[-1]['content'] == 'last' and ids == encode_prompt(kept, tok)


def test_streamer_waits_for_whole_characters():
    tok = load_tokenizer('qwen3')
    ids = tok.encode('héllo 世界 🙂')

    class Out:
        text = ''

        def write(self, s):
            Out.text += s

        def flush(self):
            pass
    s = sample_sft.Streamer(tok, out=Out())
    for t in ids + [tok.im_end_id]:
        s(0, t)
    assert Out.text == 'héllo 世界 🙂' and '\ufffd' not in Out.text


def test_hf_directory_and_checkpoint_chat_in_their_own_format(tmp_path):
    import shutil
    transformers = pytest.importorskip('transformers')
    from family_tokenizers import build_family_dir
    from chat_format import get_format, resolve_format
    tok_dir = build_family_dir(tmp_path / 'tok', 'llama3')
    tok = load_tokenizer(tok_dir)
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=128)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / 'hf')
    for name in ('tokenizer.json', 'tokenizer_config.json', 'generation_config.json'):
        shutil.copyfile(os.path.join(tok_dir, name), tmp_path / 'hf' / name)
    model, hf_tok, fmt = sample_sft.load_model(str(tmp_path / 'hf'))
    assert fmt.name == 'llama3' and hf_tok.source_dir == str(tmp_path / 'hf')
    eot = hf_tok.special_tokens['<|eot_id|>']
    assert sample_sft.stop_ids(hf_tok, fmt)[0] == eot
    msgs = [{'role': 'user', 'content': 'hi'}]
    _, ids = sample_sft.fit_history(msgs, hf_tok, fmt, budget=100)
    assert hf_tok.decode(ids).endswith('<|start_header_id|>assistant<|end_header_id|>\n\n')
    # a checkpoint replays the format its data was prepared with (here: mistral on a mistral tokenizer)
    m_dir = build_family_dir(tmp_path / 'm', 'mistral')
    m_tok = load_tokenizer(m_dir)
    mcfg = ModelArchitectureConfig.from_dict(dict(ModelArchitectureConfig.from_preset('tiny').to_dict(),
                                                  vocab_size=m_tok.vocab_size, n_layer=1))
    meta = dict(m_tok.meta(), chat_format=resolve_format(m_tok).meta())
    save_checkpoint(tmp_path / 'ckpt.pt', {'model': ConfigurableGPT(mcfg).state_dict(),
                                           'model_args': mcfg.to_dict(), 'iter_num': 0,
                                           'config': {'chat_template': 'auto'}, 'tokenizer': meta})
    _, tok2, fmt2 = sample_sft.load_model(str(tmp_path / 'ckpt.pt'))
    assert fmt2 is get_format('mistral', tok2)
    assert tok2.decode(encode_prompt(msgs, tok2, fmt2)) == '<s>[INST] hi[/INST]'


def test_lora_checkpoint_replies_like_its_adapter_model(tmp_path, ckpt, capsys):
    import shutil

    from checkpoint import load_checkpoint
    from lora import LoRAConfig, adapter_state_dict, apply_lora, base_fingerprint
    shutil.copy(ckpt, tmp_path / 'base.pt')
    base, meta = load_checkpoint(tmp_path / 'base.pt')
    cfg = LoRAConfig(rank=4, targets='q_proj,v_proj,down_proj')
    record = {'source': str(tmp_path / 'base.pt'), **base_fingerprint(base)}
    model = apply_lora(base, cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    save_checkpoint(tmp_path / 'lora.pt', {'model': adapter_state_dict(model), 'model_args': meta['model_args'],
                                           'lora': cfg.to_dict(), 'base': record, 'iter_num': 1,
                                           'config': {'chat_template': 'chatml'}, 'tokenizer': meta['tokenizer']})
    tok = load_tokenizer('qwen3')
    prompt = encode_prompt([{'role': 'user', 'content': 'What is 2 + 2?'}], tok)
    want = model.eval().generate([prompt], max_new_tokens=6, temperature=0, stop_ids=sample_sft.stop_ids(tok))[0]
    assert len(want) == 6   # six tokens of (random) text, no early stop: the comparison means something
    sample_sft.main([str(tmp_path / 'lora.pt'), '--prompt', 'What is 2 + 2?', '--max_new_tokens', '6',
                     '--no_stream'])
    assert capsys.readouterr().out.strip() == tok.decode([t for t in want if t not in sample_sft.stop_ids(tok)]).strip()


@pytest.mark.parametrize('device, error', [('cuda', "device='cuda': CUDA is not available here"),
                                           ('gpu', "device='gpu': expected cpu, cuda, cuda:N, mps")])
def test_device_not_here_is_a_clear_error_before_loading(tmp_path, monkeypatch, device, error):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(SystemExit, match=error):   # before the missing checkpoint is noticed
        sample_sft.main([str(tmp_path / 'nope.pt'), '--prompt', 'x', '--device', device])
