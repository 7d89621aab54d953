"""The chat template of a converted Honeybee: chat messages -> the official prompt, as text the plain tokenizer turns
into the official ids. The converter (and the tiny-model factory) give it to `HoneybeeProcessor`, which saves it as
chat_template.jinja, as a LLaVA repository carries its template.

The official code tokenizes a prompt in pieces, split at `<image>`, "\nHuman: " and "\nAI: ", each piece with
sentencepiece's dummy prefix, and ends every answer with `</s>`. The rendered text carries that itself: a space where
each piece's dummy prefix goes (none after a special token, where the tokenizer adds it) and the `</s>`s; the
tokenizer's front end (convert/tokenizer.py) keeps each role marker a piece of its own.
"""

import re

from ..processing_honeybee import AI, HUMAN, IMAGE_TOKEN, NO_PROMPT, SYSTEM_PROMPT

# Renders chat messages as the official prompt, tokenizer-ready:
#   <s>{system} \nHuman: <image>\nHuman:  {question} \nAI:  {answer}</s>\nHuman: ...
# A system message replaces the default system prompt; the system message "[NO_PROMPT]" renders the official
# pre-training caption format, `<s><image>{caption}</s>` (the official code drops the "[NO_PROMPT] " text). Each
# answer, its dummy-prefix space and its `</s>` sit in a `{% generation %}` block: what the official loss supervises.
# A piece gets no space after a special token or when it starts with one (`state.bare`, `edge.starts`): the
# tokenizer adds no dummy prefix there.
# In `_TEMPLATE`, `@NAME@` stands for the constant of that name; `@EDGES@` sets edge.starts / edge.ends: whether
# `text` starts / ends with a special token.
_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set specials = [bos_token, eos_token, unk_token, '@IMAGE_TOKEN@'] | select('string') | list -%}"
    "{%- set state = namespace(system='@SYSTEM_PROMPT@', bare=true) -%}"
    "{%- for m in messages if m['role'] == 'system' -%}"
    "{%- set state.system = m['content'] if m['content'] is string else "
    "(m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ')) -%}"
    "{%- endfor -%}"
    "{%- set turns = messages | rejectattr('role', 'equalto', 'system') | list -%}"
    "{%- if state.system == '@NO_PROMPT@' -%}"
    "{%- if turns | length != 2 or turns[0]['role'] != 'user' or turns[1]['role'] != 'assistant' -%}"
    "{{- raise_exception('@NO_PROMPT@ (a pre-training caption) takes one user turn with one image and one "
    "assistant turn with the caption') -}}"
    "{%- endif -%}"
    "{%- set caption = turns[1]['content'] if turns[1]['content'] is string else "
    "(turns[1]['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('')) -%}"
    "{{- '@IMAGE_TOKEN@' -}}{%- generation -%}{{- caption + eos_token -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{%- set text = state.system -%}@EDGES@{{- text -}}{%- set state.bare = text == '' or edge.ends -%}"
    "{%- for m in turns -%}"
    "{%- set items = [{'type': 'text', 'text': m['content']}] if m['content'] is string else m['content'] -%}"
    "{%- if m['role'] == 'user' -%}"
    "{%- for item in items if item['type'] in ('image', 'text') -%}"
    "{{- '' if state.bare else ' ' -}}"
    "{%- if item['type'] == 'image' -%}{{- '@HUMAN@@IMAGE_TOKEN@' -}}{%- set state.bare = true -%}"
    "{%- else -%}"
    "{%- set text = item['text'] -%}@EDGES@"
    "{{- '@HUMAN@' + (('' if edge.starts else ' ') + text if text else '') -}}"
    "{%- set state.bare = text != '' and edge.ends -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{%- set text = items | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -%}@EDGES@"
    "{{- ('' if state.bare else ' ') + '@AI@' -}}"
    "{%- generation -%}{{- (('' if edge.starts else ' ') + text if text else '') + eos_token -}}{%- endgeneration -%}"
    "{%- set state.bare = true -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- ('' if state.bare else ' ') + '@AI@' -}}{%- endif -%}"
    "{%- endif -%}"
)
_TEMPLATE_CONSTANTS = {
    "@EDGES@": "{%- set edge = namespace(starts=false, ends=false) -%}"
    "{%- for special in specials if text.startswith(special) -%}{%- set edge.starts = true -%}{%- endfor -%}"
    "{%- for special in specials if text.endswith(special) -%}{%- set edge.ends = true -%}{%- endfor -%}",
    "@IMAGE_TOKEN@": IMAGE_TOKEN,
    "@SYSTEM_PROMPT@": SYSTEM_PROMPT.replace("'", "\\'"),
    "@NO_PROMPT@": NO_PROMPT,
    "@HUMAN@": HUMAN.replace("\n", "\\n"),
    "@AI@": AI.replace("\n", "\\n"),
}
CHAT_TEMPLATE = re.sub("|".join(_TEMPLATE_CONSTANTS), lambda m: _TEMPLATE_CONSTANTS[m.group()], _TEMPLATE)
