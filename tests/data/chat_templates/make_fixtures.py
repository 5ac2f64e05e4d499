#!/usr/bin/python3
"""Renders the reference outputs of the chat templates here, as transformers' apply_chat_template does.

Run with Debian's python3-jinja2 (the engine transformers uses):

    /usr/bin/python3 tests/data/chat_templates/make_fixtures.py

For every <model>.tokenizer_config.json here it writes <model>.renders.json: the conversations of
CASES that apply to the model, each with the text the template renders or, where the template
calls raise_exception, the message it raises; and jinja_snippets.json, the renders of SNIPPETS.
tests/common/chat_template_test.cc renders the same cases through lychee::ChatTemplate and
compares byte for byte.
"""

import datetime
import glob
import json
import os

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

HERE = os.path.dirname(os.path.abspath(__file__))

# strftime_now reads the clock; the fixtures pin it (the test passes the same local time).
NOW = datetime.datetime(2025, 7, 26, 14, 30, 5)


def make_environment():
    """The environment of transformers.utils.chat_template_utils._compile_jinja_template."""

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(format):
        return NOW.strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def special_tokens(config):
    """tokenizer.special_tokens_map: the special tokens the config sets, as strings."""
    tokens = {}
    for key in ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"]:
        value = config.get(key)
        if isinstance(value, dict):
            value = value["content"]
        if value is not None:
            tokens[key] = value
    if config.get("additional_special_tokens"):
        tokens["additional_special_tokens"] = [t["content"] if isinstance(t, dict) else t
                                               for t in config["additional_special_tokens"]]
    return tokens


LLAMA = {"llama-3", "llama-3.1", "llama-3.2"}
QWEN = {"qwen2.5", "qwen3"}
MISTRAL = {"mistral-nemo-lenml", "mistral-nemo-llamacpp", "mistral-small-3.2"}
# Newer templates, with macros and the safe filter.
NEWER = {"qwen3.5", "qwen3-coder", "gpt-oss"}
ALL = LLAMA | QWEN | MISTRAL | NEWER
# The templates that render tool definitions and tool calls.
TOOLS = {"llama-3.1", "llama-3.2"} | QWEN | MISTRAL | NEWER

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city, e.g. \"Paris\".",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
# Numbers, booleans, null, unicode and a "return" entry (Mistral Nemo's template skips it).
SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search_notes",
        "description": "Searches the notes — full text, ranked.",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string"},
                "limit": {"type": "integer", "default": 10, "minimum": 1},
                "threshold": {"type": "number", "default": 0.5, "maximum": 1e-07},
                "exact": {"type": "boolean", "default": False},
                "tag": {"type": ["string", "null"], "default": None},
            },
            "required": ["query"],
        },
        "return": {"type": "array", "items": {"type": "string"}},
    },
}

WEATHER_CALL = {"id": "call12345", "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Zürich", "unit": "celsius"}}}
SEARCH_CALL = {"id": "call67890", "type": "function",
               "function": {"name": "search_notes",
                            "arguments": {"query": "tea \"oolong\"", "limit": 3, "threshold": 0.25,
                                          "exact": True, "tag": None}}}
WEATHER_RESULT = {"role": "tool", "tool_call_id": "call12345", "name": "get_weather",
                  "content": "{\"temperature\": 21.5, \"sky\": \"clear\"}"}
SEARCH_RESULT = {"role": "tool", "tool_call_id": "call67890", "name": "search_notes",
                 "content": "[\"Oolong is semi-oxidised.\"]"}

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def user(text):
    return {"role": "user", "content": text}


def assistant(text, **fields):
    return {"role": "assistant", "content": text, **fields}


# name, the models it applies to, and the arguments of apply_chat_template: messages, tools,
# add_generation_prompt and extra variables (template kwargs).
CASES = [
    dict(name="system_user", models=ALL, messages=[SYSTEM, user("What is the capital of France?")],
         add_generation_prompt=True),
    dict(name="user_only_no_generation_prompt", models=ALL, messages=[user("Hello!")]),
    dict(name="multi_turn", models=ALL,
         messages=[SYSTEM, user("Hi, who are you?"), assistant("I am an assistant."), user("Tell me a joke.")],
         add_generation_prompt=True),
    dict(name="ends_with_assistant", models=ALL,
         messages=[user("2 + 2?"), assistant("4"), user("And 3 + 3?"), assistant("6")]),
    dict(name="unicode_and_whitespace", models=ALL,
         messages=[user("  Grüße, 世界! 🎉\tTabs, \"quotes\", 'single' and back\\slash\n\u3000"),
                   assistant("\nÇa va ? ¿Qué tal? \u00a0"), user("Ünïcödé → ✓ \r\n")],
         add_generation_prompt=True),
    dict(name="jinja_looking_text", models=ALL,
         messages=[user("{{ messages }} {% if true %}yes{% endif %} {# note #} {{ raise_exception('x') }}")],
         add_generation_prompt=True),
    dict(name="tools", models=TOOLS, messages=[SYSTEM, user("What's the weather in Zürich?")],
         tools=[WEATHER_TOOL, SEARCH_TOOL], add_generation_prompt=True),
    dict(name="tools_no_system", models=TOOLS, messages=[user("Find my notes on tea.")],
         tools=[SEARCH_TOOL], add_generation_prompt=True),
    dict(name="tool_call_round_trip", models=TOOLS,
         messages=[user("What's the weather in Zürich?"), assistant("", tool_calls=[WEATHER_CALL]),
                   WEATHER_RESULT, assistant("It is 21.5 °C and clear."), user("Thanks!")],
         tools=[WEATHER_TOOL], add_generation_prompt=True),
    dict(name="tool_call_pending_result", models=TOOLS,
         messages=[SYSTEM, user("Search my notes for oolong."), assistant("", tool_calls=[SEARCH_CALL]),
                   SEARCH_RESULT],
         tools=[SEARCH_TOOL], add_generation_prompt=True),
    dict(name="parallel_tool_calls", models=QWEN | MISTRAL,
         messages=[user("Weather in Zürich, and my tea notes?"),
                   assistant("", tool_calls=[WEATHER_CALL, SEARCH_CALL]), WEATHER_RESULT, SEARCH_RESULT],
         tools=[WEATHER_TOOL, SEARCH_TOOL], add_generation_prompt=True),
    dict(name="parallel_tool_calls_rejected", models={"llama-3.1", "llama-3.2"},
         messages=[user("Weather in Zürich, and my tea notes?"),
                   assistant("", tool_calls=[WEATHER_CALL, SEARCH_CALL])],
         tools=[WEATHER_TOOL, SEARCH_TOOL]),
    dict(name="tool_call_arguments_as_string", models=QWEN,
         messages=[user("Weather?"),
                   assistant("Let me check.", tool_calls=[{"type": "function", "function": {
                       "name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}])],
         tools=[WEATHER_TOOL]),
    dict(name="tools_in_system_message", models={"llama-3.1", "llama-3.2"},
         messages=[SYSTEM, user("What's the weather in Zürich?")], tools=[WEATHER_TOOL],
         add_generation_prompt=True, variables={"tools_in_user_message": False, "date_string": "01 Jan 2025"}),
    dict(name="builtin_tools", models={"llama-3.1"},
         messages=[SYSTEM, user("Search the web for the tallest tower."),
                   assistant("", tool_calls=[{"type": "function", "function": {
                       "name": "brave_search", "arguments": {"query": "tallest tower", "count": "3"}}}]),
                   {"role": "ipython", "content": {"results": ["Burj Khalifa"]}}],
         add_generation_prompt=True, variables={"builtin_tools": ["brave_search", "code_interpreter", "wolfram_alpha"]}),
    dict(name="custom_tools_variable", models={"llama-3.1", "llama-3.2"},
         messages=[user("Weather in Rome?")], add_generation_prompt=True,
         variables={"custom_tools": [WEATHER_TOOL], "date_string": "05 Feb 2025"}),
    dict(name="tools_without_user_message", models={"llama-3.1", "llama-3.2"},
         messages=[SYSTEM], tools=[WEATHER_TOOL]),
    dict(name="thinking_history", models={"qwen3", "qwen3.5"},
         messages=[user("Is 17 prime?"),
                   assistant("Yes, 17 is prime.", reasoning_content="Check divisors up to 4: none divide 17."),
                   user("And 21?"),
                   assistant("<think>\n21 = 3 * 7.\n</think>\n\nNo, 21 = 3 × 7."),
                   user("And 23?")],
         add_generation_prompt=True),
    dict(name="thinking_last_assistant", models={"qwen3", "qwen3.5"},
         messages=[user("Is 17 prime?"),
                   assistant("Yes.", reasoning_content="\nDivisors up to 4 fail.\n")]),
    dict(name="enable_thinking_false", models={"qwen3", "qwen3.5"}, messages=[user("Quick: 2 + 2?")],
         add_generation_prompt=True, variables={"enable_thinking": False}),
    dict(name="enable_thinking_true", models={"qwen3", "qwen3.5"}, messages=[user("Quick: 2 + 2?")],
         add_generation_prompt=True, variables={"enable_thinking": True}),
    dict(name="thinking_with_tools", models={"qwen3", "qwen3.5"},
         messages=[SYSTEM, user("Weather in Zürich?"),
                   assistant("", reasoning_content="I should call the tool.", tool_calls=[WEATHER_CALL]),
                   WEATHER_RESULT,
                   {"role": "user", "content": "<tool_response>\nextra\n</tool_response>"}],
         tools=[WEATHER_TOOL], add_generation_prompt=True, variables={"enable_thinking": True}),
    dict(name="roles_must_alternate", models=MISTRAL, messages=[user("One."), user("Two.")],
         add_generation_prompt=True),
    dict(name="tool_call_id_rejected", models=MISTRAL,
         messages=[user("Weather?"), assistant("", tool_calls=[{"id": "short", "type": "function",
                                                                "function": WEATHER_CALL["function"]}])]),
    dict(name="unknown_role_rejected", models=MISTRAL,
         messages=[{"role": "developer", "content": "Be brief."}, user("Hi")]),
    dict(name="content_blocks", models={"mistral-small-3.2"},
         messages=[{"role": "system", "content": [{"type": "text", "text": "Answer in French."}]},
                   {"role": "user", "content": [{"type": "text", "text": "What is in this image? "},
                                                {"type": "image_url", "image_url": {"url": "x.png"}}]},
                   {"role": "assistant", "content": [{"type": "text", "text": "Un chat."}]},
                   user("Merci")],
         add_generation_prompt=True),
    dict(name="system_later_in_conversation", models=QWEN | {"mistral-small-3.2"},
         messages=[user("Hi"), assistant("Hello."), {"role": "system", "content": "Now answer tersely."},
                   user("Why is the sky blue?")],
         add_generation_prompt=True),
]


# Small templates that exercise each construct of the subset on its own (whitespace control,
# scoping, printing, filters, tests, methods, loops), rendered with `variables`; written to
# jinja_snippets.json.
SNIPPETS = [
    ("trim_and_lstrip_blocks", "<{% if true %}\n  a\n  {% if true %}\n    b\n  {% endif %}\n{% endif %}\n>", {}),
    ("whitespace_control", "a  {{- ' b ' -}}  c\n  {%- if true -%}\n  d  {%- endif %}  e {#- note -#}  f", {}),
    ("plus_keeps_whitespace", "x\n  {%+ if true +%}\ny{% endif %}\n  {#+ c #}z", {}),
    ("comments_and_variables_keep_indentation", "  {{ 'v' }}\n  {# c #}\n  w\n{% set q = 1 %}  {{ q }}", {}),
    ("trailing_newline_dropped", "line\n", {}),
    ("crlf_newlines", "a\r\n{% if true %}\r\nb\r\n{% endif %}\r\nc", {}),
    ("set_in_loop_is_per_iteration",
     "{% set x = 1 %}{% for i in [1, 2] %}[{{ x }}{% set x = i * 10 %}{{ x }}]{% endfor %}{{ x }}"
     "{% for i in [1, 2] %}{% if i == 1 %}{% set y = 'a' %}{% endif %}({{ y }}){% endfor %}", {}),
    ("set_in_if_is_visible", "{% set x = 1 %}{% if true %}{% set x = 2 %}{% endif %}{{ x }}", {}),
    ("namespace", "{% set ns = namespace(count=0, names=[]) %}{% for m in messages %}{% set ns.count = ns.count + 1 %}"
     "{% endfor %}{{ ns.count }} {{ ns }} {{ namespace({'a': 1}, b=2).b }}", {"messages": [{}, {}, {}]}),
    ("set_block_and_unpacking", "{% set a, b = 1, 'two' %}{{ a }}{{ b }}{% set block | trim | upper %}\n  text {{ a }}\n{% endset %}[{{ block }}]", {}),
    ("print_python_values", "{{ [1, 'a', None, True, 1.5, {'k': \"it's\", 'q': 'say \"hi\"'}, (1,), (), ('x', 2)] }} "
     "{{ none }} {{ False }} {{ {} }} {{ 'caf\u00e9\\n\\t' }} {{ ['caf\u00e9', '\\n', '\\x00\\x7f', '\\u200b', '\\U0001f600', 'tab\\there'] }}", {}),
    ("print_floats", "{{ 1.0 }} {{ 1e16 }} {{ 1e15 }} {{ 0.0001 }} {{ 0.00001 }} {{ 1/3 }} {{ -0.0 }} {{ 2.5e-10 }} {{ 123456789.123 }} "
     "{{ x }} {{ [x, y] }}", {"x": 1e300, "y": 1.1}),
    ("arithmetic", "{{ 7 // 2 }} {{ -7 // 2 }} {{ -7 % 3 }} {{ 7 % -3 }} {{ 7.5 // 2 }} {{ -7.5 % 2 }} {{ 10 / 4 }} {{ 10 / 5 }} "
     "{{ 2 ** 10 }} {{ 2 ** -1 }} {{ 2 ** 3 ** 2 }} {{ -2 ** 2 }} {{ 1 + 2 * 3 - 4 }} {{ 'ab' * 2 }} {{ [0] * 3 }} "
     "{{ [1] + [2] }} {{ True + 1 }} {{ 1 ~ none ~ 'x' ~ [1] }} {{ -x }} {{ +x }}", {"x": 5}),
    ("comparisons", "{{ 1 < 2 < 3 }} {{ 3 > 2 > 2 }} {{ 'a' < 'b' }} {{ [1, 2] < [1, 3] }} {{ 1 == 1.0 }} {{ True == 1 }} "
     "{{ {'a': 1, 'b': 2} == {'b': 2, 'a': 1} }} {{ [1] == (1,) }} {{ 'a' in 'cat' }} {{ 'x' not in ['x'] }} "
     "{{ 'k' in {'k': 1} }} {{ none == none }} {{ undefined_name == none }}", {}),
    ("and_or_give_operands", "{{ 0 or 'x' }} {{ '' and 'y' }} {{ 'a' and 'b' }} {{ none or [] }} {{ not none }} {{ not 'a' }}", {}),
    ("inline_if", "{{ 'yes' if 1 else 'no' }} [{{ 'yes' if 0 }}] {{ 'a' if false else 'b' if true else 'c' }}", {}),
    ("string_literals", "{{ 'tab\\there' }}|{{ \"q'uote\" }}|{{ '\\x41\\u00e9\\101\\d' }}|{{ 'a' 'b' }}|{{ '\\\\' }}", {}),
    ("string_methods", "{{ '  a b  '.strip() }}|{{ 'xxaxx'.strip('x') }}|{{ '\\n\\na\\n'.lstrip('\\n') }}|{{ 'a\\n\\n'.rstrip() }}|"
     "{{ ' a  b c '.split() }}|{{ 'a,b,,c'.split(',') }}|{{ 'a b c'.split(' ', 1) }}|{{ ' a  b c '.split(none, 1) }}|"
     "{{ 'hello world'.startswith('hell') }}{{ 'x.py'.endswith(('.js', '.py')) }}|{{ 'aaa'.replace('a', 'b', 2) }}|"
     "{{ 'ab'.replace('', '-') }}|{{ \"they're 3rd-best\".title() }}|{{ 'mIxEd'.upper() }}{{ 'mIxEd'.lower() }}{{ 'mIxEd'.capitalize() }}|"
     "{{ text.split('</think>')[-1].lstrip('\\n') }}|{{ 'caf\u00e9 \u4e16\u754c'[2:5] }}|{{ 'abc'[::-1] }}|{{ 'abc'[-1] }}", {"text": "<think>x</think>\n\nanswer"}),
    ("unicode_whitespace_strip", "[{{ text.strip() }}][{{ text | trim }}][{{ text.split() }}]", {"text": "\u3000\u00a0 a\u2003b \u2029\u0085"}),
    ("slices", "{{ [1, 2, 3, 4][::-1] }} {{ [1, 2, 3, 4][1:] }} {{ [1, 2, 3, 4][-2:] }} {{ [1, 2, 3, 4][:-1] }} {{ [1, 2, 3, 4][::2] }} "
     "{{ [1, 2, 3, 4][3:0:-1] }} {{ [1, 2, 3, 4][10:] }} {{ (1, 2, 3)[1:] }} {{ [1, 2][5] is defined }}", {}),
    ("loops", "{% for x in ['a', 'b', 'c'] %}{{ loop.index }}{{ loop.index0 }}{{ loop.revindex }}{{ loop.revindex0 }}"
     "{{ loop.first }}{{ loop.last }}{{ loop.length }}{{ loop.previtem }}{{ loop.nextitem }}{{ loop.cycle('o', 'e') }}|{% endfor %}"
     "{% for x in [] %}x{% else %}empty{% endfor %}|{% for i in range(10) %}{% if i == 2 %}{% continue %}{% endif %}"
     "{% if i == 5 %}{% break %}{% endif %}{{ i }}{% endfor %}|{% for i in range(6) if i is odd %}{{ i }}{{ loop.index }}{{ loop.last }},{% endfor %}|"
     "{% for k, v in {'a': 1, 'b': 2}.items() %}{{ k }}={{ v }};{% endfor %}|{% for k in {'x': 1, 'y': 2} %}{{ k }}{% endfor %}|"
     "{% for c in 'h\u00e9' %}[{{ c }}]{% endfor %}|{% for a, b in [[1, 2], (3, 4)] %}{{ a + b }}{% endfor %}|{{ loop is defined }}", {}),
    ("nested_loops", "{% for i in [1, 2] %}{% for j in [1, 2] %}{{ loop.index }}{{ i }}{% endfor %}{{ loop.index }};{% endfor %}", {}),
    ("filters_text", "{{ '  x  ' | trim }}|{{ 'xxhixx' | trim('x') }}|{{ 'a-b' | replace('-', '+') }}|{{ 'hello WORLD' | title }}|"
     "{{ 'don\\'t stop-me (now)' | title }}|{{ 'ab' | upper }}{{ 'AB' | lower }}{{ 'aB' | capitalize }}|{{ 5 | string }}{{ none | string }}|"
     "{{ 'h\u00e9llo' | length }}{{ [1, 2] | count }}{{ {'a': 1} | length }}|{{ 'abc' | reverse }}|{{ [1, 2, 3] | reverse | list }}", {}),
    ("filters_numbers", "{{ '42' | int + 1 }} {{ '42.73' | int }} {{ ' 12 ' | int }} {{ '1_000' | int }} {{ 'x' | int }} {{ 'x' | int(7) }} "
     "{{ 3.9 | int }} {{ -3.9 | int }} {{ true | int }} {{ none | int }} {{ '1.5' | float }} {{ 'x' | float }} {{ 2 | float }} {{ '1e3' | float }}", {}),
    ("filters_sequences", "{{ [1, 2, 3] | first }}{{ [1, 2, 3] | last }}{{ 'abc' | first }}{{ {'k': 1, 'z': 2} | last }}|{{ [] | first is defined }}|"
     "{{ ['a', 1, none] | join(', ') }}|{{ users | join('/', attribute='name') }}|{{ 'abc' | list }}|{{ {'a': 1} | list }}|"
     "{{ [1, 2, 3, 4] | select('odd') | list }}{{ [1, 2, 3, 4] | reject('even') | list }}{{ [0, 1, '', 'a'] | select | list }}|"
     "{{ users | selectattr('admin') | map(attribute='name') | list }}|{{ users | rejectattr('name', 'equalto', 'ann') | map(attribute='name') | join }}|"
     "{{ users | selectattr('age', 'gt', 30) | list | length }}|{{ users | map(attribute='missing', default='?') | list }}|"
     "{{ ['a', 'b'] | map('upper') | list }}|{{ users | selectattr('tags.0', 'equalto', 'x') | map(attribute='name') | first }}|"
     "{{ none | selectattr('x') | list }}{{ none | map(attribute='x') | list }}{{ '' | select | list }}|"
     "{% for k, v in {'b': 1, 'a': 2} | items %}{{ k }}{{ v }}{% endfor %}|{{ undefined_name | items | list }}",
     {"users": [{"name": "ann", "admin": True, "age": 31, "tags": ["x"]}, {"name": "bob", "admin": False, "age": 25, "tags": ["y"]}]}),
    ("filter_default", "{{ missing | default('d') }} {{ '' | default('d') }} {{ '' | default('d', true) }} {{ none | default('d') }} "
     "{{ missing | d('e') }} {{ 0 | default(5, boolean=true) }}", {}),
    ("tojson", "{{ data | tojson }}\n{{ data | tojson(indent=2) }}\n{{ data | tojson(indent='\\t', sort_keys=true) }}\n"
     "{{ data | tojson(separators=(',', ':')) }}\n{{ data | tojson(ensure_ascii=true) }}\n{{ [] | tojson(indent=2) }}{{ {} | tojson }}"
     "{{ 'x' | tojson }}{{ none | tojson }}{{ 1.0 | tojson }}{{ (1, 2) | tojson }}",
     {"data": {"z": [1, 2.5, None, True, {"nested": []}], "a": "caf\u00e9 \U0001f600 \"q\" \\ \n\t\u0001\u007f", "big": 12345678901234567, "e": 1e-07}}),
    ("tests", "{{ x is defined }}{{ missing is undefined }}{{ none is none }}{{ 1 is number }}{{ true is number }}{{ 1.5 is float }}"
     "{{ 1 is integer }}{{ true is integer }}{{ true is boolean }}{{ true is true }}{{ 1 is true }}{{ false is false }}"
     "{{ 's' is string }}{{ {} is mapping }}{{ [] is iterable }}{{ 's' is iterable }}{{ missing is iterable }}{{ 3 is iterable }}"
     "{{ [] is sequence }}{{ {} is sequence }}{{ 3 is sequence }}{{ raise_exception is callable }}{{ 's' is callable }}"
     "{{ 3 is odd }}{{ 4 is even }}{{ 9 is divisibleby 3 }}{{ 'abc' is lower }}{{ 'ABC' is upper }}{{ 'a' is in 'cat' }}"
     "{{ none is sameas none }}{{ false is sameas 0 }}{{ 2 is eq 2 }}{{ 2 is ne 2 }}{{ 2 is lt 3 }}{{ 2 is gt 3 }}{{ 2 is ge 2 }}"
     "{{ 2 is le 1 }}{{ 2 is equalto 2 }}{{ 2 is greaterthan 1 }}{{ 2 is lessthan 1 }}{{ x is not none }}{{ not x is none }}"
     "{{ strftime_now is defined }}{{ x.missing is defined }}{{ 's'.missing is defined }}", {"x": {"k": 1}}),
    ("dict_methods", "{{ d.get('a') }} {{ d.get('zz') }} {{ d.get('zz', 'dflt') }} {{ d.keys() | list }} {{ d.values() | list }} "
     "{{ d['items'] }} {{ d.a }} {{ d['a'] }} {{ d.missing is defined }} {{ dict(p=1, q='r') }}", {"d": {"a": 1, "items": "key"}}),
    ("undefined_values", "[{{ missing }}][{{ missing | length }}][{{ missing | trim }}][{% for x in missing %}x{% endfor %}]"
     "[{{ missing ~ 'a' }}][{{ missing | list }}][{{ missing is sequence }}][{{ (missing.attr is defined) if missing is defined }}]", {}),
    ("strftime_now", "{{ strftime_now('%d %b %Y') }}|{{ strftime_now('%Y-%m-%d %H:%M:%S %A %B %j %p') }}", {}),
    ("macros", "{% set greeting = 'hi' %}{% macro render(item, sep=', ', upper=false) %}{{ greeting }} "
     "{{ item.name | upper if upper else item.name }}{% for tag in item.tags %}{{ sep }}{{ tag }}{% endfor %}"
     "{% set local = 1 %}{% endmacro %}{% set greeting = 'hello' %}{{ render(users[0]) }}|{{ render(users[1], ' / ') }}|"
     "{{ render(item=users[0], upper=true) }}|{{ render(users[0]) | length }}|[{{ local }}]{{ render is defined }}"
     "{% macro countdown(n) %}{% if n > 0 %}{{ n }}{{ countdown(n - 1) }}{% endif %}{% endmacro %}|{{ countdown(3) }}"
     "{% macro missing(a, b) %}[{{ a }}][{{ b }}][{{ varargs }}][{{ kwargs }}]{% endmacro %}|{{ missing(1) }}"
     "{% set ns = namespace(calls=0) %}{% macro count() %}{% set ns.calls = ns.calls + 1 %}{% endmacro %}"
     "{{ count() }}{{ count() }}|{{ ns.calls }}",
     {"users": [{"name": "ann", "tags": ["x", "y"]}, {"name": "bob", "tags": []}]}),
    ("safe_strings", "{% set args = data | tojson | safe %}{{ args }}|{{ '<p>' ~ args ~ '</p>' }}|{{ '<p>' + args }}|"
     "{{ args + '&' }}|{{ args | length }}{{ args is string }}{{ args == data | tojson }}|{{ [args] }}|{{ (5 | safe) + '<' }}|"
     "{{ args | string + '\"' }}|{{ args | tojson }}|{{ args ~ 1 }}", {"data": {"q": "<a & 'b'>"}}),
    ("range_and_dict", "{{ range(3) | list }} {{ range(1, 10, 3) | list }} {{ range(5, 0, -2) | list }} {{ range(0) | list }}", {}),
]


def render(template, tokens, case):
    """The text apply_chat_template renders for `case`, or the message raise_exception raised."""
    try:
        return {"expected": template.render(messages=case["messages"], tools=case.get("tools"), documents=None,
                                            add_generation_prompt=case.get("add_generation_prompt", False),
                                            **tokens, **case.get("variables", {}))}
    except jinja2.exceptions.TemplateError as error:
        # Only the template's own raise_exception is an expected outcome; any other error (an
        # undefined value, a type error) means the case does not suit the template.
        if type(error) is not jinja2.exceptions.TemplateError:
            raise
        return {"expected_error": str(error)}


def main():
    env = make_environment()
    for config_path in sorted(glob.glob(os.path.join(HERE, "*.tokenizer_config.json"))):
        model = os.path.basename(config_path)[:-len(".tokenizer_config.json")]
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        template = env.from_string(config["chat_template"])
        tokens = special_tokens(config)
        renders = []
        for case in CASES:
            if model not in case["models"]:
                continue
            inputs = {key: case[key] for key in ["messages", "tools", "add_generation_prompt", "variables"]
                      if key in case}
            renders.append({"name": case["name"], **inputs, **render(template, tokens, case)})
        write_json(f"{model}.renders.json", renders)
    write_json("jinja_snippets.json", [{"name": name, "template": source, "variables": variables,
                                        "expected": env.from_string(source).render(**variables)}
                                       for name, source, variables in SNIPPETS])


def write_json(name, cases):
    with open(os.path.join(HERE, name), "w", encoding="utf-8") as f:
        json.dump({"jinja2_version": jinja2.__version__, "now": NOW.isoformat(), "cases": cases}, f,
                  ensure_ascii=False, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
