"""Text to token ids and back for `fp8nemo generate`: the checkpoint's `tokenizer.json` through
the `tokenizers` package (its `chat_template` from `tokenizer_config.json` for chat prompts), or
space-separated token ids where a model has no tokenizer (presets, bare checkpoints)."""

from __future__ import annotations

import os

from fp8nemo.quant.files import checkpoint_file, checkpoint_json


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class TextCodec:
    """`encode(text, chat=False) -> ids`, `decode(ids) -> text`, and `increment(ids)`: the text
    the ids add since the last call (for streaming)."""

    def __init__(self, tokenizer=None, config: dict | None = None, where: str = "model"):
        self.tokenizer, self.config, self.where = tokenizer, config or {}, where
        self._shown = ""

    @classmethod
    def for_model(cls, path: str) -> TextCodec:
        if not os.path.isdir(path):
            return cls(where=path)
        file = checkpoint_file(path, "tokenizer.json")
        if file is None:
            return cls(where=path)
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ValueError(
                f"{path} has a tokenizer.json; reading it needs the tokenizers package "
                f"(pip install tokenizers), or give token ids"
            ) from None
        try:
            tokenizer = Tokenizer.from_file(file)
        except Exception as err:  # tokenizers raises its own exception type
            raise ValueError(
                f"{os.path.join(path, 'tokenizer.json')} cannot be read: {err}"
            ) from None
        return cls(tokenizer, checkpoint_json(path, "tokenizer_config.json"), path)

    def encode(self, text: str, chat: bool = False) -> list[int]:
        if self.tokenizer is None:
            if chat:
                raise ValueError(f"{self.where} has no tokenizer.json: --chat needs one")
            try:
                return [int(t) for t in text.replace(",", " ").split()]
            except ValueError:
                raise ValueError(
                    f"{self.where} has no tokenizer.json: the prompt must be token ids "
                    f"separated by spaces; got {text!r}"
                ) from None
        if not chat:
            return self.tokenizer.encode(text).ids
        rendered = self._chat(text)
        return self.tokenizer.encode(rendered, add_special_tokens=False).ids

    def _chat(self, text: str) -> str:
        template = self.config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if not isinstance(template, str):
            raise ValueError(f"{self.where}: tokenizer_config.json has no chat_template for --chat")
        # A checkpoint's template is code from the internet: render it sandboxed.
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(template).render(
                messages=[{"role": "user", "content": text}], add_generation_prompt=True,
                bos_token=_token_text(self.config.get("bos_token")) or "",
                eos_token=_token_text(self.config.get("eos_token")) or "",
            )  # fmt: skip
        except TemplateError as err:
            raise ValueError(f"{self.where}: its chat_template fails: {err}") from None

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return " ".join(map(str, ids))
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def increment(self, ids: list[int]) -> str:
        text = self.decode(ids)
        if self.tokenizer is None:
            text += " "
        new = text[len(self._shown) :] if text.startswith(self._shown) else text
        self._shown = text
        return new
