import json
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
from chat_format import encode_conversation, encode_prompt  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402
import export_hf  # noqa: E402

CONV = [
    {'role': 'system', 'content': 'Reply with JSON.'},
    {'role': 'user', 'content': 'What is 3 + 4?'},
    {'role': 'assistant', 'content': '{"answer": 7}'},
    {'role': 'user', 'content': "Now double it, s'il vous plaît — ça va?  Ünïcödé 世界"},
    {'role': 'assistant', 'content': 'Sure:\n{"answer": 14}\n\nDone.'},
]


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp('export')
    torch.manual_seed(0)
    cfg = ModelArchitectureConfig.from_preset('tiny')
    model = ConfigurableGPT(cfg)
    with torch.no_grad():  # non-trivial norms so a mis-mapped weight shows up in the logits
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    save_checkpoint(d / 'ckpt.pt', {'model': model.state_dict(), 'model_args': cfg.to_dict(),
                                    'iter_num': 0, 'config': {'chat_template': 'chatml'},
                                    'tokenizer': load_tokenizer('qwen3').meta()})
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'export_hf.py'), str(d / 'ckpt.pt'),
                        str(d / 'hf')], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    return model.eval(), d / 'hf'


@pytest.mark.slow
def test_transformers_reload_gives_the_same_logits(exported):
    from transformers import AutoModelForCausalLM
    model, hf_dir = exported
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
    ids, _ = encode_conversation(CONV, load_tokenizer('qwen3'))
    x = torch.tensor([ids])
    with torch.no_grad():
        ours, _ = model(x)
        theirs = hf(x).logits
    assert (ours - theirs).abs().max().item() < 1e-4


@pytest.mark.slow
def test_chat_template_reproduces_training_ids(exported):
    from transformers import AutoTokenizer
    _, hf_dir = exported
    tok = load_tokenizer('qwen3')
    hf_tok = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)

    def apply(msgs, **kw):
        out = hf_tok.apply_chat_template(msgs, tokenize=True, **kw)
        return list(out['input_ids'] if hasattr(out, 'keys') else out)
    assert apply(CONV) == encode_conversation(CONV, tok)[0]
    assert apply(CONV[:4], add_generation_prompt=True) == encode_prompt(CONV[:4], tok)
    tools = [{'role': 'user', 'content': 'Weather?'},
             {'role': 'assistant', 'content': '', 'tool_calls': [
                 {'type': 'function', 'function': {'name': 'get', 'arguments': {'city': 'Paris'}}}]},
             {'role': 'tool', 'content': '{"t": 20}'}, {'role': 'tool', 'content': 'ok'},
             {'role': 'assistant', 'content': 'It is 20.', 'reasoning_content': 'read it'}]
    assert apply(tools) == encode_conversation(tools, tok)[0]


@pytest.mark.slow
def test_generation_config_stops_at_im_end(exported):
    _, hf_dir = exported
    gen = json.loads((hf_dir / 'generation_config.json').read_text())
    tok = load_tokenizer('qwen3')
    assert gen['eos_token_id'] == [tok.im_end_id, tok.pad_id] and gen['pad_token_id'] == tok.pad_id
    names = set(os.listdir(hf_dir))
    assert {'config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json'} <= names
    assert not [n for n in os.listdir(hf_dir.parent) if 'export' in n]  # no staging left behind


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match='nope.pt'):
        export_hf.main([str(tmp_path / 'nope.pt'), str(tmp_path / 'out')])
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('umask', [0o022, 0o027])
def test_the_export_gets_the_modes_the_umask_gives_not_private_ones(tmp_path, umask):
    import stat
    torch.manual_seed(0)
    cfg = ModelArchitectureConfig.from_preset('tiny', vocab_size=320, n_layer=1)
    save_checkpoint(tmp_path / 'ckpt.pt', {'model': ConfigurableGPT(cfg).state_dict(), 'model_args': cfg.to_dict()})
    old = os.umask(umask)
    try:
        out = export_hf.export(str(tmp_path / 'ckpt.pt'), str(tmp_path / 'hf'))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o777 & ~umask
    files = os.listdir(out)
    assert 'model.safetensors' in files and 'tokenizer.json' in files
    for name in files:
        assert stat.S_IMODE(os.stat(os.path.join(out, name)).st_mode) == 0o666 & ~umask, name


@pytest.mark.parametrize('family', ['llama3', 'mistral', 'qwen2.5', 'qwen3', 'chatml', 'hf'])
def test_export_ships_the_trained_chat_template_and_stop_ids_of_each_family(family, tmp_path):
    """apply_chat_template(history, add_generation_prompt=True) on the export gives the prompt ids
    training put in front of every reply; generation_config stops at the format's stop ids."""
    import random
    from transformers import AutoTokenizer
    from family_tokenizers import LLAMA30_TEMPLATE, build_family_dir, for_hf, random_conversation
    from chat_format import resolve_format
    source = 'llama3' if family == 'hf' else family   # 'hf': Llama 3.0's template, no built-in
    d = build_family_dir(tmp_path / 'tok', source, LLAMA30_TEMPLATE if family == 'hf' else None)
    tok = load_tokenizer(d)
    fmt = resolve_format(tok)
    assert fmt.name == family
    cfg = ModelArchitectureConfig.from_dict(dict(ModelArchitectureConfig.from_preset('tiny').to_dict(),
                                                 vocab_size=tok.vocab_size, n_layer=1))
    save_checkpoint(tmp_path / 'ckpt.pt', {
        'model': ConfigurableGPT(cfg).state_dict(), 'model_args': cfg.to_dict(), 'iter_num': 0,
        'config': {'chat_template': 'auto'}, 'tokenizer': dict(tok.meta(), chat_format=fmt.meta())})
    out = export_hf.export(str(tmp_path / 'ckpt.pt'), str(tmp_path / 'hf'))
    hf = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert hf.chat_template == fmt.template
    rng, prompts = random.Random(family), 0
    for _ in range(20):
        msgs = random_conversation(rng, source)
        if family == 'hf' and (msgs[0].get('tools') or any(m['role'] == 'tool' for m in msgs)):
            continue
        for k, m in enumerate(msgs):
            if m['role'] == 'assistant':
                history, tools = for_hf(msgs[:k])
                ids = hf.apply_chat_template(history, tools=tools, add_generation_prompt=True,
                                             return_dict=False)
                assert list(ids) == encode_prompt(msgs[:k], tok, chat_template=fmt)
                prompts += 1
    assert prompts >= 20
    gen = json.loads((tmp_path / 'hf' / 'generation_config.json').read_text())
    eos = gen['eos_token_id'] if isinstance(gen['eos_token_id'], list) else [gen['eos_token_id']]
    assert eos == list(fmt.stop_ids) and eos[0] == fmt.end_id


# ---------------------------------------------------------------- LoRA checkpoints: merged or PEFT

@pytest.fixture(scope='module')
def lora_runs(tmp_path_factory):
    """A random Hugging Face Qwen3 base and a LoRA and a QLoRA (DoRA) run of train_sft on it."""
    import transformers

    import train_sft
    from test_train_sft import tiny_cfg, write_shards
    d = tmp_path_factory.mktemp('lora')
    data = write_shards(d / 'data')
    cfg = transformers.Qwen3Config(vocab_size=151936, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                   max_position_embeddings=128, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(cfg).save_pretrained(d / 'base')
    runs = {}
    for finetune, extra in (('lora', dict(lora_targets='all,embed_tokens')), ('qlora', dict(lora_dora=True))):
        train_sft.train(tiny_cfg(d / finetune, data_dir=str(data), init_from=f'hf:{d / "base"}', finetune=finetune,
                                 lora_rank=4, learning_rate=1e-2, max_iters=3, eval_interval=3, **extra))
        runs[finetune] = d / finetune / 'out' / 'ckpt.pt'
    return d / 'base', runs


@pytest.mark.slow
@pytest.mark.parametrize('finetune', ['lora', 'qlora'])
def test_lora_checkpoint_exports_merged_and_as_peft_with_the_adapter_models_logits(lora_runs, finetune, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from checkpoint import load_checkpoint
    base_dir, runs = lora_runs
    ours, _ = load_checkpoint(runs[finetune])
    ids, _ = encode_conversation(CONV, load_tokenizer('qwen3'))
    x = torch.tensor([ids])
    with torch.no_grad():
        ref = ours.eval()(x)[0]
        export_hf.main([str(runs[finetune]), str(tmp_path / 'merged')])
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / 'merged', local_files_only=True).eval()
        # merged in fp32 into the base it trained on (QLoRA: the dequantized NF4 base)
        assert (merged(x).logits - ref).abs().max().item() < 1e-4
        export_hf.main([str(runs[finetune]), str(tmp_path / 'adapter'), '--peft'])
        cfg = json.loads((tmp_path / 'adapter' / 'adapter_config.json').read_text())
        assert cfg['base_model_name_or_path'] == str(base_dir)
        peft_model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True), tmp_path / 'adapter').eval()
        got = peft_model(x).logits
    if finetune == 'lora':   # the adapters onto the very base they trained on: the same model
        assert (got - ref).abs().max().item() < 1e-4
    else:   # on the original (not NF4) base: close, not equal; that is what the merged export fixes
        assert 1e-4 < (got - ref).abs().max().item() < 0.5 * ref.abs().max().item()


def test_peft_export_of_a_full_checkpoint_is_a_clear_error(exported, tmp_path):
    model, hf_dir = exported
    ckpt = hf_dir.parent / 'ckpt.pt'
    with pytest.raises(SystemExit, match='--peft exports the adapters of a LoRA checkpoint'):
        export_hf.main([str(ckpt), str(tmp_path / 'a'), '--peft'])
    assert not (tmp_path / 'a').exists()


# ---------------------------------------------------------------- the output directory, bad arguments

def _tiny_ckpt(tmp_path):
    torch.manual_seed(0)
    cfg = ModelArchitectureConfig.from_preset('tiny', vocab_size=320, n_layer=1)
    save_checkpoint(tmp_path / 'ckpt.pt', {'model': ConfigurableGPT(cfg).state_dict(), 'model_args': cfg.to_dict()})
    return str(tmp_path / 'ckpt.pt')


def test_export_over_an_earlier_peft_export_leaves_no_adapter_behind(tmp_path):
    """transformers applies an adapter_config.json it finds beside a model: a stale one must go."""
    ckpt, out = _tiny_ckpt(tmp_path), tmp_path / 'hf'
    out.mkdir()
    (out / 'adapter_config.json').write_text('{"peft_type": "LORA"}')
    (out / 'adapter_model.safetensors').write_bytes(b'old')
    export_hf.main([ckpt, str(out)])
    names = set(os.listdir(out))
    assert 'config.json' in names and not names & {'adapter_config.json', 'adapter_model.safetensors'}
    assert sorted(os.listdir(tmp_path)) == ['ckpt.pt', 'hf']   # no staging or old copy left


def test_export_refuses_a_directory_with_files_it_did_not_write_before_any_work(tmp_path):
    out = tmp_path / 'hf'
    out.mkdir()
    (out / 'notes.txt').write_text('mine')
    (out / 'config.json').write_text('{}')
    # a checkpoint that does not exist: the directory is checked before anything is loaded
    with pytest.raises(SystemExit, match=rf'{out}: holds files an export does not write \(notes.txt\)'):
        export_hf.main([str(tmp_path / 'nope.pt'), str(out)])
    assert sorted(os.listdir(out)) == ['config.json', 'notes.txt']


def test_export_to_an_existing_file_is_a_clear_error_before_any_work(tmp_path):
    (tmp_path / 'out').write_text('mine')
    with pytest.raises(SystemExit, match='out: exists and is not a directory'):
        export_hf.main([str(tmp_path / 'nope.pt'), str(tmp_path / 'out')])
    assert (tmp_path / 'out').read_text() == 'mine'


def test_an_unusable_tokenizer_asked_for_is_an_error_not_a_warning(tmp_path):
    ckpt = _tiny_ckpt(tmp_path)
    with pytest.raises(SystemExit, match=r"--tokenizer .*typo: unknown tokenizer"):
        export_hf.main([ckpt, str(tmp_path / 'hf'), '--tokenizer', str(tmp_path / 'typo')])
    assert not (tmp_path / 'hf').exists()
