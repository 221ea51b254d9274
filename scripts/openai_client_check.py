#!/usr/bin/env python3
"""Drive `itt serve` with the official `openai` Python package, as a user's tool would.

Usage: openai_client_check.py BASE_URL (e.g. http://127.0.0.1:8080/v1). Exits non-zero with a
message on the first check that fails. Run by tests/serve.rs when scripts/setup_pyclient.sh
has made .cache/itt/venv.
"""
import sys

import openai

base = sys.argv[1]
client = openai.OpenAI(base_url=base, api_key="none")
model = client.models.list().data[0].id

# Completions: greedy, streamed equal to whole.
whole = client.completions.create(model=model, prompt="12+34=", max_tokens=8, temperature=0)
text = whole.choices[0].text
streamed = "".join(c.choices[0].text for c in client.completions.create(
    model=model, prompt="12+34=", max_tokens=8, temperature=0, stream=True) if c.choices)
assert streamed == text, (streamed, text)

# Scoring as lm-evaluation-harness's local-completions does: echo, logprobs 1, max_tokens 0.
scored = client.completions.create(model=model, prompt="12+34=46", max_tokens=0, echo=True, logprobs=1)
lp = scored.choices[0].logprobs
assert scored.choices[0].text == "12+34=46"
assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:]), lp.token_logprobs
assert len(lp.tokens) == len(lp.text_offset) == len(lp.top_logprobs)
# Token-id prompts, several at once: one choice per prompt.
ids = client.completions.create(model=model, prompt=[[3, 4, 5], [6, 7]], max_tokens=2, temperature=0)
assert [c.index for c in ids.choices] == [0, 1]

# Chat with logprobs, streamed equal to whole.
msgs = [{"role": "user", "content": "5+5="}]
chat = client.chat.completions.create(model=model, messages=msgs, max_tokens=6, temperature=0,
                                      logprobs=True, top_logprobs=3)
content = chat.choices[0].logprobs.content
assert all(len(e.top_logprobs) == 3 for e in content)
assert all(e.top_logprobs[0].logprob == e.logprob for e in content), "greedy picks the top token"
parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
    model=model, messages=msgs, max_tokens=6, temperature=0, stream=True) if c.choices]
assert "".join(parts) == chat.choices[0].message.content

# The thinking extension through extra_body: pinned ratios come back as run.
r = client.completions.create(model=model, prompt="12+", max_tokens=3,
                              extra_body={"thinking": {"ratios": [0.5, 0.25, 0.25]}})
thinking = r.choices[0].model_extra["thinking"]  # fields beyond OpenAI's land in model_extra
assert thinking["ratios"] == [0.5, 0.25, 0.25], thinking

# Penalties and logit_bias reach the sampler.
forced = client.completions.create(model=model, prompt="1", max_tokens=3, temperature=0, logit_bias={"5": 100})
assert len(set(forced.choices[0].text)) == 1, forced.choices[0].text

# A bad request is an APIError with status 400, not a crash.
try:
    client.completions.create(model=model, prompt="1", logprobs=21)
    raise SystemExit("logprobs 21 was accepted")
except openai.BadRequestError as e:
    assert "logprobs" in str(e)
print(f"openai {openai.__version__}: completions, streaming, echo scoring, token prompts, chat "
      f"logprobs, extra_body thinking, logit_bias and a 400 all as expected")
