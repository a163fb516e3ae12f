"""Text generation around the swarm model, without a swarm: the blocks run in this process.

A stand-in session runs the tiny model's decoder (final norm removed: the local head applies
it), so ``SwarmModel.generate`` sees exactly what a swarm of its blocks would return.
"""

from __future__ import annotations

import pytest
import torch

from fedswarm.client.swarm import model as model_module
from fedswarm.client.swarm.head import load_head
from fedswarm.client.swarm.model import SwarmModel
from fedswarm.client.swarm.sampling import Sampling, TokenPicker
from fedswarm.client.swarm.textgen import TextStream, encode, eos_token_ids, generate_text
from fedswarm.common.errors import InputError
from fedswarm.common.model import load_model, parse_model

PROMPT = [504, 3575, 282, 4649, 314]  # "The capital of France is"
IM_START, IM_END, END_OF_TEXT = 1, 2, 0


class LocalSession:
    """``InferenceSession``'s interface over the tiny model's blocks in this process."""

    def __init__(self, _client: object, max_length: int, _adapter: str | None = None) -> None:
        from transformers import DynamicCache

        self.model = load_model("tiny").model
        self.model.norm = torch.nn.Identity()
        self.cache = DynamicCache()
        self.links: list[object] = []
        self.max_length = max_length

    def step(self, embeds: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(inputs_embeds=embeds, past_key_values=self.cache, use_cache=True).last_hidden_state

    def server_ms(self) -> float:
        return 0.0

    def __enter__(self) -> LocalSession:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


@pytest.fixture()
def local_swarm_model(monkeypatch) -> SwarmModel:
    monkeypatch.setattr(model_module, "InferenceSession", LocalSession)
    return SwarmModel(client=None, head=load_head(parse_model("tiny")))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def local_tokens() -> list[int]:
    model = load_model("tiny")
    out = model.generate(torch.tensor([PROMPT]), max_new_tokens=10, do_sample=False, eos_token_id=None)
    return out[0, len(PROMPT) :].tolist()


def test_end_tokens_of_the_model_include_the_chat_turn_end(tokenizer):
    assert tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]) == [IM_END, END_OF_TEXT]
    assert eos_token_ids(parse_model("tiny"), tokenizer) == {IM_END, END_OF_TEXT}


def test_greedy_generation_equals_the_local_model(local_swarm_model, local_tokens, tokenizer):
    result = generate_text(local_swarm_model, tokenizer, PROMPT, 10, frozenset())
    assert result.tokens == local_tokens
    assert result.text == tokenizer.decode(local_tokens, skip_special_tokens=True)
    assert result.finish_reason == "length" and result.prompt_tokens == len(PROMPT)


def test_generation_stops_at_an_end_token_and_does_not_show_it(local_swarm_model, local_tokens, tokenizer):
    end = local_tokens[3]  # treated as the end token: the model really produces it at step 4
    shown: list[str] = []
    result = generate_text(local_swarm_model, tokenizer, PROMPT, 10, frozenset({end}), on_text=shown.append)
    assert result.tokens == local_tokens[:4]
    assert result.finish_reason == "stop"
    assert result.text == "".join(shown) == tokenizer.decode(local_tokens[:3], skip_special_tokens=True)


def test_special_tokens_are_never_shown(tokenizer):
    stream = TextStream(tokenizer)
    pieces = [stream.push(t) for t in [*encode(tokenizer, "Paris."), IM_END, 198, IM_START]]
    assert "".join(pieces) + stream.finish() == "Paris.\n"


def test_stop_string_split_over_tokens_is_held_back_then_cut(tokenizer):
    ids = encode(tokenizer, " Paris.\n\nThe answer")
    stream = TextStream(tokenizer, stop=["\n\nThe"])
    pieces = [stream.push(t) for t in ids]
    assert stream.stopped and "".join(pieces) == stream.text == " Paris."
    assert all("\n" not in piece for piece in pieces)
    unfinished = TextStream(tokenizer, stop=["\n\nZ"])
    assert "".join(unfinished.push(t) for t in ids) + unfinished.finish() == " Paris.\n\nThe answer"


def test_a_character_split_over_tokens_appears_whole(tokenizer):
    ids = encode(tokenizer, "café 東京")
    stream = TextStream(tokenizer)
    pieces = [stream.push(t) for t in ids]
    assert "".join(pieces) == "café 東京" and all("\ufffd" not in p for p in pieces)


def test_stop_string_ends_the_generation(local_swarm_model, local_tokens, tokenizer):
    text = tokenizer.decode(local_tokens, skip_special_tokens=True)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    result = generate_text(local_swarm_model, tokenizer, PROMPT, 10, frozenset(), stop=[stop])
    assert result.finish_reason == "stop" and result.text == text[: text.index(stop)]
    assert len(result.tokens) < 10


def test_seeded_sampling_repeats_and_greedy_is_argmax():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    draws = [[TokenPicker(Sampling(temperature=1.0, seed=s))(logits) for _ in range(1)] for s in (7, 7)]
    assert draws[0] == draws[1]
    picker = TokenPicker(Sampling(temperature=1.0, top_p=1e-6, seed=3))
    assert {picker(logits) for _ in range(20)} == {int(logits.argmax())}  # the nucleus keeps the top token only
    assert TokenPicker()(logits) == int(logits.argmax())


def test_seeded_generation_repeats(local_swarm_model, tokenizer):
    sampling = Sampling(temperature=1.0, top_p=0.9, seed=11)
    runs = [generate_text(local_swarm_model, tokenizer, PROMPT, 6, frozenset(), sampling).tokens for _ in range(2)]
    assert runs[0] == runs[1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"temperature": -1.0}, "temperature must be between 0 and 2"), ({"top_p": 0.0}, r"top_p must be in \(0, 1\]")],
)
def test_bad_sampling_values_are_named(kwargs, message):
    with pytest.raises(InputError, match=message):
        Sampling(**kwargs)


def test_empty_prompt_and_too_many_stops_are_refused(local_swarm_model, tokenizer):
    with pytest.raises(InputError, match="prompt: empty"):
        generate_text(local_swarm_model, tokenizer, [], 4, frozenset())
    with pytest.raises(InputError, match="stop: at most 4"):
        generate_text(local_swarm_model, tokenizer, PROMPT, 4, frozenset(), stop=list("abcde"))


def test_streamed_text_equals_one_decode_of_a_long_generation(tokenizer):
    text = "Déjà vu: 東京タワー は 333 m.\n  Indented  line; emoji 🙂 and ünïcödé. " * 40
    ids = encode(tokenizer, text)
    ids[100:100] = [IM_END, 198, IM_START]  # special tokens in the middle are skipped, the newline is kept
    stream = TextStream(tokenizer)
    streamed = "".join(stream.push(t) for t in ids) + stream.finish()
    assert streamed == tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert len(ids) > 500
