"""Text in, text out around :meth:`SwarmModel.generate`: prompts, end-of-sequence, stop strings, streaming.

One path for every front end (``fedswarm swarm generate`` and the HTTP API), so both stop at
the model's end-of-sequence tokens and never show special tokens. Text is streamed as the
difference between successive decodes of all tokens so far: a character split over two
tokens appears once it is whole, and text that may begin a stop string is held back until
it is clear that it does not.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fedswarm.client.swarm.sampling import Sampling, TokenPicker
from fedswarm.common.errors import InputError

if TYPE_CHECKING:
    from fedswarm.client.swarm.model import SwarmModel
    from fedswarm.client.swarm.session import InferenceSession
    from fedswarm.common.model import ModelSpec

END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>")  # chat and text ends, when in vocab
MAX_STOP_STRINGS = 4  # OpenAI's limit


def eos_token_ids(spec: ModelSpec, tokenizer: Any) -> frozenset[int]:
    """Every token that ends a generation: the tokenizer's EOS, the generation config's, and chat turn ends."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = _configured_eos(spec)
    ids.update([configured] if isinstance(configured, int) else configured or [])
    vocab = tokenizer.get_vocab()
    special = set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {}))
    ids.update(vocab[token] for token in END_TOKENS if token in vocab and token in special)
    return frozenset(ids)


def _configured_eos(spec: ModelSpec) -> int | list[int] | None:
    """``eos_token_id`` of the model's generation config (its config for ``tiny``, which has no folder)."""
    if spec.name == "tiny":
        from fedswarm.common.model import tiny_config

        return tiny_config().eos_token_id
    from transformers import GenerationConfig

    from fedswarm.common.model import model_folder

    try:
        return GenerationConfig.from_pretrained(model_folder(spec)).eos_token_id
    except OSError:  # no generation_config.json: fall back to config.json's
        from transformers import AutoConfig

        return getattr(AutoConfig.from_pretrained(model_folder(spec)), "eos_token_id", None)


def chat_prompt(tokenizer: Any, messages: Sequence[dict[str, str]]) -> str:
    """The messages through the model's chat template, ending where the assistant's answer begins."""
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("this model's tokenizer has no chat template; use /v1/completions")
    try:
        return str(tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False))
    except Exception as exc:  # noqa: BLE001 (jinja raises TemplateError for messages the template rejects)
        raise InputError(f"messages: the chat template rejects them ({exc})") from None


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of text as is (no BOS added: chat templates and the model's own text carry theirs)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class TextStream:
    """Incremental detokenisation with stop strings: ``push`` a token, get the text it makes safe to show.

    Each token's text is the difference between decodes of a short window of tokens with and
    without it (vLLM's scheme: the window keeps a tokenizer's leading-space rules right, and
    costs the same at the 4000th token as at the first).
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.tokens: list[int] = []
        self.text = ""  # shown so far
        self.stopped = False  # a stop string appeared: ``text`` ends just before it
        self._decoded = ""  # the text of tokens[:_read], final
        self._prefix = 0  # the window decoded for context starts here
        self._read = 0

    def push(self, token: int) -> str:
        """Add a token; returns the new text that can be shown (possibly "")."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        self._advance(force=False)
        return self._emit(final=False)

    def finish(self) -> str:
        """The text held back at the end (an unfinished character, a partial stop string that never completed)."""
        if self.stopped:
            return ""
        self._advance(force=True)
        return self._emit(final=True)

    def _advance(self, force: bool) -> None:
        before = self._decode(self.tokens[self._prefix : self._read])
        after = self._decode(self.tokens[self._prefix :])
        if len(after) > len(before) and (force or not after.endswith("\ufffd")):  # else: a character is unfinished
            self._decoded += after[len(before) :]
            self._prefix, self._read = self._read, len(self.tokens)

    def _emit(self, final: bool) -> str:
        full = self._decoded
        for stop in self.stop:
            at = full.find(stop, max(0, len(self.text) - len(stop)))
            if at >= 0:
                self.stopped = True
                return self._show(full[:at])
        return self._show(full if final else full[: len(full) - self._held_back(full)])

    def _decode(self, tokens: list[int]) -> str:
        return str(self.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False))

    def _held_back(self, full: str) -> int:
        """Characters at the end that may begin a stop string."""
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(full)), longest, -1):
                if full.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def _show(self, shown: str) -> str:
        if len(shown) <= len(self.text) or not shown.startswith(self.text):
            return ""
        delta, self.text = shown[len(self.text) :], shown
        return delta


@dataclass
class TextResult:
    """A finished generation: its text, its tokens, why it ended and when each token came."""

    text: str
    prompt_tokens: int
    tokens: list[int]
    finish_reason: str  # "stop" (end-of-sequence or a stop string) or "length" (max_new_tokens)
    hops: int = 0
    started: float = 0.0  # time.perf_counter() when the generation began (before the route was opened)
    token_times: list[float] = field(default_factory=list)  # time.perf_counter() as each token arrived

    @property
    def elapsed_s(self) -> float:
        """Seconds from the start to the last token (0 without tokens)."""
        return self.token_times[-1] - self.started if self.token_times else 0.0

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)


def generate_text(
    model: SwarmModel,
    tokenizer: Any,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    eos_ids: frozenset[int],
    sampling: Sampling | None = None,
    stop: Sequence[str] = (),
    on_text: Callable[[str], bool | None] | None = None,
    adapter: str | None = None,
) -> TextResult:
    """Generate through the swarm; ``on_text`` sees each new piece of text and may return True to cancel.

    ``adapter`` names an unmerged adapter the servers announce ("" the base; default: the client's).
    """
    if len(stop) > MAX_STOP_STRINGS:
        raise InputError(f"stop: at most {MAX_STOP_STRINGS} strings, got {len(stop)}")
    if not prompt_ids:
        raise InputError("prompt: empty (the swarm needs at least one token)")
    stream = TextStream(tokenizer, stop)
    started = time.perf_counter()
    times: list[float] = []
    cancelled = False

    def on_token(token: int, _session: InferenceSession) -> bool:
        nonlocal cancelled
        times.append(time.perf_counter())
        delta = "" if token in eos_ids else stream.push(token)
        if delta and on_text is not None:
            cancelled = on_text(delta) is True
        return stream.stopped or cancelled

    pick = TokenPicker(sampling)
    result = model.generate(
        prompt_ids, max_new_tokens, eos_ids, on_token=on_token, pick=pick, keep_logits=False, adapter=adapter
    )
    tail = stream.finish()
    if tail and on_text is not None and not cancelled:
        on_text(tail)
    ended = stream.stopped or (bool(result.tokens) and result.tokens[-1] in eos_ids)
    return TextResult(
        text=stream.text,
        prompt_tokens=len(prompt_ids),
        tokens=result.tokens,
        finish_reason="stop" if ended else "length",
        hops=result.hops,
        started=started,
        token_times=times,
    )
