"""Train the byte-level BPE tokenizer that ships with every generated checkpoint.

The model hub is unreachable from our build and test machines, so checkpoints come with a
tokenizer trained on the small English corpus in ``serve_app/tools/corpus``. It follows the
GPT-2/Qwen recipe (byte-level pre-tokenizer, no prefix space, ChatML special tokens), so code
that handles Qwen tokenizers handles this one too.
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# NOTE: order fixes the ids (0, 1, 2); tests and generation configs look them up by name.
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

# Qwen2.5's ChatML template: one block per message, an open assistant block when the caller
# asks for a generation prompt, and Qwen's tool calling: `tools` listed in the system block,
# assistant `tool_calls` as <tool_call> JSON, consecutive `tool` results in one user block as
# <tool_response>. Without tools the output is plain ChatML, as before.
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\n\n' }}{%- endif %}"
    "{{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}"
    "{%- for tool in tools %}{{- '\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call><|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if tools and loop.first and message['role'] == 'system' %}"
    "{%- elif message['role'] == 'assistant' and message.tool_calls %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message['content'] %}{{- '\n' + message['content'] }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- set call = tool_call.function if tool_call.function is defined else tool_call %}"
    '{{- \'\n<tool_call>\n{"name": "\' + call.name + \'", "arguments": \' }}'
    "{%- if call.arguments is string %}{{- call.arguments }}"
    "{%- else %}{{- call.arguments | tojson }}{%- endif %}"
    "{{- '}\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}"
    "{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\n<tool_response>\n' + message['content'] + '\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}"
    "{{- '<|im_end|>\n' }}{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

# 256 byte symbols plus the special tokens; anything smaller cannot encode arbitrary text.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def corpus_files() -> list[Path]:
    """The shipped corpus files, sorted so that training sees them in a fixed order."""
    root = resources.files("serve_app.tools") / "corpus"
    files = sorted((Path(str(p)) for p in root.iterdir() if p.name.endswith(".txt")), key=str)
    if not files:
        raise FileNotFoundError(f"no corpus/*.txt found under {root}")
    return files


def _corpus_lines(files: list[Path]) -> Iterator[str]:
    for f in files:
        yield from f.read_text(encoding="utf-8").splitlines(keepends=True)


def build_bpe(vocab_size: int) -> Tokenizer:
    """Train the raw `tokenizers` BPE model on the shipped corpus.

    Deterministic: the corpus order is fixed and the trainer breaks frequency ties by pair
    order, so the same ``vocab_size`` always yields the same merges and ids.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE}, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps offsets on raw bytes, as Qwen2's tokenizer.json does.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        # Seeding all 256 bytes guarantees any UTF-8 input (emoji, CJK) stays encodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    files = corpus_files()
    tok.train_from_iterator(_corpus_lines(files), trainer=trainer)
    return tok


def train_tokenizer(vocab_size: int, out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Train a ChatML byte-level BPE of ``vocab_size`` tokens and save it to ``out_dir``.

    The saved directory loads with ``AutoTokenizer.from_pretrained`` and supports
    ``apply_chat_template``. There is no BOS token; ``<|endoftext|>`` is both EOS and PAD.
    """
    fast = PreTrainedTokenizerFast(
        tokenizer_object=build_bpe(vocab_size),
        bos_token=None,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return fast
