"""InternVL2's conversation templates: generation prompts, training labels and an equivalent Jinja chat template.

The original InternVL code (internvl_chat/internvl/conversation.py and train/dataset.py) writes every chat as
`system + sep + (role + message + sep)*` (its "MPT" style) and has one training-label function per template.
This module reproduces both, token for token, on any tokenizer that segments like the original:

- `encode_prompt` builds the prompt that `model.chat()` feeds to generate.
- `encode_conversation` builds the `input_ids` / `labels` that InternVL's fine-tuning trainer feeds, including the
  original's quirks (it counts tokens piece by piece and masks the whole sample when the count disagrees).
- `chat_template` is a Jinja template that renders the same prompt text, for exported tokenizers.

Verified against the reference fixtures (made with the original code): the training ids and labels of
`internlm2-chat`, `Hermes-2` (preprocess_mpt) and `internvl2_5` (preprocess_internvl2_5), the prompt ids of
`internlm2-chat` and the prompt text of all four templates. `phi3-chat` (preprocess_phi3) follows the original
source; no fixture has Phi-3's tokenizer, so only its layout and label structure are tested.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from captune.errors import CaptuneError

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"

_INTERNVL2_SYSTEM = ("你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，"
                     "英文名叫InternVL, 是一个有用无害的人工智能助手。")
_INTERNVL2_5_SYSTEM = ("你是书生·万象，英文名是InternVL，"
                       "是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。")


@dataclass(frozen=True)
class Template:
    """One InternVL conversation template (all four use the original's MPT separator style).

    A prompt is `system + system_message + sep`, then `user + question + sep` and `assistant + answer + sep` per
    turn; a generation prompt ends with `assistant`. `stop` is the string generation stops on. `preprocess` names
    the original training-label function: "internlm", "mpt", "phi3" or "internvl2_5"; `strip_messages` whether it
    strips each message (only preprocess_internlm does).
    """

    name: str
    system_message: str
    system: str
    user: str
    assistant: str
    sep: str
    stop: str
    preprocess: str
    strip_messages: bool = False

    def render(self, messages: list[str], system_message: str | None = None, generation: bool = False) -> str:
        """The conversation text: `messages` alternate user/assistant, starting with the user."""
        text = self.system + (self.system_message if system_message is None else system_message) + self.sep
        for i, message in enumerate(messages):
            role = self.user if i % 2 == 0 else self.assistant
            text += role + message + self.sep if message else role  # the original's rule for empty messages
        return text + (self.assistant if generation else "")


TEMPLATES = {
    t.name: t
    for t in (
        Template("internlm2-chat", _INTERNVL2_SYSTEM, "<|im_start|>system\n", "<|im_start|>user\n",
                 "<|im_start|>assistant\n", "<|im_end|>", "<|im_end|>", "internlm", strip_messages=True),
        Template("Hermes-2", _INTERNVL2_SYSTEM, "<|im_start|>system\n", "<|im_start|>user\n",
                 "<|im_start|>assistant\n", "<|im_end|>", "<|im_end|>", "mpt"),
        Template("phi3-chat", _INTERNVL2_SYSTEM, "<|system|>\n", "<|user|>\n", "<|assistant|>\n", "<|end|>", "<|end|>",
                 "phi3"),
        Template("internvl2_5", _INTERNVL2_5_SYSTEM, "<|im_start|>system\n", "<|im_start|>user\n",
                 "<|im_start|>assistant\n", "<|im_end|>\n", "<|im_end|>", "internvl2_5"),
    )
}


def get_template(name: str | Template) -> Template:
    """The template called `name` (a Template passes through)."""
    if isinstance(name, Template):
        return name
    if name not in TEMPLATES:
        raise CaptuneError(f"unknown conversation template {name!r}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def stop_token_id(tokenizer: Any, template: str | Template) -> int:
    """Id of the template's stop string (`<|im_end|>` = 92542 for InternLM2)."""
    return token_id(tokenizer, get_template(template).stop)


def image_tokens(num_image_tokens: int) -> str:
    return IMG_START + IMG_CONTEXT * num_image_tokens + IMG_END


def encode_prompt(tokenizer: Any, question: str, num_image_tokens: int, template: str | Template,
                  system_message: str | None = None) -> list[int]:
    """The ids `model.chat()` generates from: one image of `num_image_tokens` tokens (all tiles), or none if 0."""
    t = get_template(template)
    if num_image_tokens > 0 and IMAGE_PLACEHOLDER not in question:
        question = IMAGE_PLACEHOLDER + "\n" + question
    text = t.render([question], system_message, generation=True)
    if num_image_tokens > 0:
        text = text.replace(IMAGE_PLACEHOLDER, image_tokens(num_image_tokens), 1)
    return list(tokenizer(text).input_ids)


def encode_conversation(tokenizer: Any, conversations: list[dict[str, str]], num_image_tokens: int,
                        template: str | Template, max_length: int | None = None) -> dict[str, list[int]]:
    """`input_ids` and `labels` (-100 where there is no loss) of one InternVL jsonl sample, as the original trainer.

    `conversations` is InternVL's list of `{"from": "human" | "gpt", "value": ...}`; a leading `{"from": "system"}`
    replaces the template's system message. With `num_image_tokens` > 0 the first human turn gets `<image>\\n` if it
    has no `<image>` (as the original dataset does), and the first `<image>` becomes `num_image_tokens` image tokens.
    `max_length` truncates like the trainer's `max_seq_length` (the original raises when that cuts the image).

    Loss is on each answer and its closing stop token. As in the original, internlm2-chat strips every message and
    the other templates keep them verbatim; for the three single-string templates, a sample whose piecewise token
    count disagrees with its real length gets no loss at all (labels all -100).
    """
    if num_image_tokens > 1:
        # <IMG_CONTEXT> is a special token: the text splits around it and each occurrence is one id, so the sample
        # with one image token, that id repeated, is the sample with all of them (tokenizing 1,792 of them per
        # caption is most of a data-loader worker's time). Truncation near the image keeps the slow path.
        one = encode_conversation(tokenizer, conversations, 1, template)
        if max_length is None or len(one["input_ids"]) - 1 + num_image_tokens < max_length:
            return _expand_image(one, token_id(tokenizer, IMG_CONTEXT), num_image_tokens)
    t = get_template(template)
    system_message, messages = _split_conversation(conversations, t.strip_messages)
    if num_image_tokens > 0 and IMAGE_PLACEHOLDER not in messages[0]:
        messages[0] = IMAGE_PLACEHOLDER + "\n" + messages[0]
    expand = image_tokens(num_image_tokens) if num_image_tokens > 0 else None

    if t.preprocess == "internvl2_5":
        input_ids, labels = _labels_per_turn(tokenizer, t, system_message, messages, expand)
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    else:
        text = t.render(messages, system_message)
        if expand:
            text = text.replace(IMAGE_PLACEHOLDER, expand, 1)
        input_ids = list(tokenizer(text).input_ids)[:max_length]
        labels = _labels_counted(tokenizer, t, text, input_ids, max_length)
    if expand and input_ids.count(token_id(tokenizer, IMG_END)) != 1:
        raise CaptuneError(f"image tokens are truncated: the sample is longer than max_length={max_length}")
    return {"input_ids": input_ids, "labels": labels}


def supervised_span(labels: list[int]) -> tuple[int, int] | None:
    """(first, last) index of the supervised labels, None when no label is supervised."""
    first = next((i for i, x in enumerate(labels) if x != IGNORE_INDEX), None)
    if first is None:
        return None
    last = len(labels) - 1
    while labels[last] == IGNORE_INDEX:
        last -= 1
    return first, last


def _expand_image(encoded: dict[str, list[int]], context_id: int, num_image_tokens: int) -> dict[str, list[int]]:
    """A sample encoded with one image token, with `num_image_tokens` of them (no loss on any)."""
    ids, labels = encoded["input_ids"], encoded["labels"]
    at = ids.index(context_id)
    return {"input_ids": ids[:at] + [context_id] * num_image_tokens + ids[at + 1 :],
            "labels": labels[:at] + [IGNORE_INDEX] * num_image_tokens + labels[at + 1 :]}


def _split_conversation(conversations: list[dict[str, str]], strip: bool) -> tuple[str | None, list[str]]:
    """(system message or None, messages alternating human/gpt) of an InternVL conversation."""
    try:
        turns = [(turn["from"], turn["value"]) for turn in conversations]
    except (TypeError, KeyError):
        raise CaptuneError('conversations must be a list of {"from": ..., "value": ...} objects') from None
    system = None
    if turns and turns[0][0] == "system":
        system, turns = turns[0][1], turns[1:]
    if turns and turns[0][0] != "human":  # the original drops a first turn that is not from the human
        turns = turns[1:]
    if not turns:
        raise CaptuneError("conversation has no human turn")
    messages = []
    for i, (role, value) in enumerate(turns):
        if role != ("human", "gpt")[i % 2] or not isinstance(value, str):
            raise CaptuneError(f"conversation turn {i} must be a {('human', 'gpt')[i % 2]!r} turn with a string value, "
                               f"got {role!r}")
        messages.append(value.strip() if strip else value)
        if not messages[-1]:
            raise CaptuneError(f"conversation turn {i} ({role}) is empty")
    return system, messages


def _ignore(target: list[int], start: int, end: int | None = None) -> None:
    """`target[start:end] = -100` with the original tensor's slice semantics (negative indices included)."""
    target[start:end] = [IGNORE_INDEX] * len(target[start:end])


def _labels_counted(tokenizer, t: Template, text: str, input_ids: list[int], max_length: int | None) -> list[int]:
    """Labels of the whole-string templates, mirroring preprocess_internlm / _mpt / _phi3 step by step."""
    def n_tokens(s: str) -> int:
        return len(tokenizer(s).input_ids)

    target = list(input_ids)
    if t.preprocess == "internlm":
        cur_len = _mask_internlm(target, n_tokens, t, text)
    elif t.preprocess == "mpt":
        cur_len = _mask_grouped(target, n_tokens, t, text, start=0, offsets=lambda i: (1, 0))
    else:  # phi3, newest version: the offsets are the original's hard-coded ones for Llama's SentencePiece
        endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        target = [IGNORE_INDEX if i == endoftext else i for i in target]
        cur_len = _mask_grouped(target, n_tokens, t, text, start=1,
                                offsets=lambda i: (0, -1) if i == 0 else (-1, -2))
    _ignore(target, cur_len)
    total_len = sum(i != tokenizer.pad_token_id for i in input_ids)
    if (max_length is None or cur_len < max_length) and cur_len != total_len:
        return [IGNORE_INDEX] * len(target)  # the original's "tokenization mismatch": the sample gives no loss
    return target


def _mask_internlm(target, n_tokens, t, text) -> int:
    """preprocess_internlm: split on the assistant role; each piece's count drops the tokenizer's bos."""
    _ignore(target, 0, 1)
    parts = text.split(t.assistant)
    cur_len = 1
    head_len = n_tokens(parts[0] + t.assistant) - 1
    _ignore(target, cur_len, cur_len + head_len)
    cur_len += head_len
    for part in parts[1:-1]:
        pieces = part.split(t.user)
        if len(pieces) != 2:
            raise CaptuneError(f"a message contains the role string {t.user!r} or {t.assistant!r}")
        answer, question = pieces
        cur_len += n_tokens(answer) - 1
        question_len = n_tokens(t.user + question + t.assistant) - 1
        _ignore(target, cur_len, cur_len + question_len)
        cur_len += question_len
    return cur_len + n_tokens(parts[-1]) - 1


def _mask_grouped(target, n_tokens, t, text, start, offsets) -> int:
    """preprocess_mpt / _phi3: (system+)user+assistant groups split on the sep; `offsets(i)` adjusts the counts."""
    _ignore(target, 0, start)
    sep = t.sep + t.assistant
    turns = text.split(t.sep)
    groups = [t.sep.join(turns[:3])] + [t.sep.join(turns[i:i + 2]) for i in range(3, len(turns), 2)]
    cur_len = start
    for i, group in enumerate(groups):
        if group == "":
            break
        turn_offset, instruction_offset = offsets(i)
        turn_len = n_tokens(group) + turn_offset
        parts = group.split(sep)
        if len(parts) != 2:
            break
        instruction_len = n_tokens(parts[0] + sep) + instruction_offset
        _ignore(target, cur_len, cur_len + instruction_len)
        cur_len += turn_len
    return cur_len


def _labels_per_turn(tokenizer, t, system_message, messages, expand):
    """preprocess_internvl2_5: each turn tokenized on its own; no mismatch check."""
    if expand:
        messages = [m.replace(IMAGE_PLACEHOLDER, expand, 1) if i == 0 else m for i, m in enumerate(messages)]
    system = t.system_message if system_message is None else system_message
    turns = [t.system + system + t.sep] + [
        (t.user if i % 2 == 0 else t.assistant) + m + t.sep for i, m in enumerate(messages)]
    probe = list(tokenizer("a").input_ids)
    adds_bos = tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]
    if adds_bos:  # the original writes the bos as text into the first turn, then drops every turn's own bos
        turns[0] = tokenizer.bos_token + turns[0]
    ids = [list(tokenizer(turn).input_ids)[1 if adds_bos else 0:] for turn in turns]
    header_len = len(tokenizer(t.assistant).input_ids) - (1 if adds_bos else 0)
    input_ids, labels = [], []
    for i, turn_ids in enumerate(ids):
        input_ids += turn_ids
        if i == 0 or i % 2 == 1:  # system and human turns
            labels += [IGNORE_INDEX] * len(turn_ids)
        else:  # no loss on the assistant header nor on the trailing "\n" of the sep
            turn_labels = list(turn_ids)
            _ignore(turn_labels, 0, header_len)
            _ignore(turn_labels, -1)
            labels += turn_labels
    return input_ids, labels


# @NAME@ placeholders are filled with Jinja string literals of the template's strings.
_CHAT_TEMPLATE = """\
{%- macro content(message) -%}
  {%- if message['content'] is string -%}{{- message['content'] -}}
  {%- else -%}
    {%- for part in message['content'] -%}
      {%- if part['type'] == 'image' -%}{{- '<image>\\n' -}}
      {%- elif part['type'] == 'text' -%}{{- part['text'] -}}
      {%- endif -%}
    {%- endfor -%}
  {%- endif -%}
{%- endmacro -%}
{%- if messages and messages[0]['role'] == 'system' -%}
  {{- @SYSTEM@ + content(messages[0]) + @SEP@ -}}
  {%- set loop_messages = messages[1:] -%}
{%- else -%}
  {{- @SYSTEM@ + @SYSTEM_MESSAGE@ + @SEP@ -}}
  {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
  {{- (@USER@ if message['role'] == 'user' else @ASSISTANT@) + content(message) + @SEP@ -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- @ASSISTANT@ -}}{%- endif -%}
"""


def chat_template(template: str | Template) -> str:
    """A Jinja chat template rendering the same prompt text as the original (the tokenizer adds the bos).

    Messages are {"role": "system" | "user" | "assistant", "content": str or a list of parts}; an {"type": "image"}
    part renders as `<image>\\n`, a {"type": "text"} part as its text. A first "system" message replaces the
    template's default system message.
    """
    t = get_template(template)
    fields = {"SYSTEM": t.system, "SYSTEM_MESSAGE": t.system_message, "USER": t.user, "ASSISTANT": t.assistant,
              "SEP": t.sep}
    text = _CHAT_TEMPLATE
    for name, value in fields.items():
        text = text.replace(f"@{name}@", json.dumps(value, ensure_ascii=False))
    return text


def token_id(tokenizer: Any, token: str) -> int:
    """The id of the single token `token`; CaptuneError if the vocabulary lacks it."""
    found = tokenizer.convert_tokens_to_ids(token)  # unknown strings give the unk id (or None)
    if found is None or tokenizer.convert_ids_to_tokens(found) != token:
        raise CaptuneError(f"the tokenizer has no token {token!r}; is it an InternVL2 tokenizer?")
    return found

