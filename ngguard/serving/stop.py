"""Stop an answer at the end of the refusal: a refusal that keeps generating is a leak.

An edited model refuses a private question with the refusal sentence the edit taught (``edit.refusal``,
default ``ngguard.world.spec.REFUSAL``), but a hostile prompt (a "Sure! Here is the answer." prefix,
ChatML markers, look-alike letters) can make it go on after the sentence: "I'm sorry, but I cannot
help with that request.011777777..." with the private number in the digits. So every serving path
(``ProtectedLVLM``: ``GreedyDecoder``, ``adapter.generate``, ``stream``) treats the refusal as an end
of sequence:

    stop = StopAfter(adapter.tokenizer, REFUSAL)
    model.generate(..., stopping_criteria=stop.criteria(prompt_length))   # the row ends at the refusal
    answer = stop.cut(answer)          # nothing after the refusal, whatever was generated

A row stops at the first step whose generated text contains the refusal (decoded as the answer is,
without special tokens); ``cut`` keeps the text up to the end of its first occurrence. The text is
checked only after a token whose own text holds the refusal's last character (cached per token id),
so a decode step costs a dictionary lookup per row otherwise.
"""
from __future__ import annotations

import threading
from typing import Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

__all__ = ["StopAfter"]


class StopAfter:
    """Ends an answer at the end of ``text`` (the refusal) in the answers ``tokenizer`` decodes."""

    def __init__(self, tokenizer, text: str):
        if not isinstance(text, str) or not text.strip():
            raise ValueError("the refusal to stop after must be a non-empty string")
        self.tokenizer = tokenizer
        self.text = text.strip()
        self._last = self.text[-1]
        self._enders: dict[int, bool] = {}
        self._lock = threading.Lock()

    def _may_end(self, token: int) -> bool:
        """Whether token ``token``'s own text holds the refusal's last character."""
        ends = self._enders.get(token)
        if ends is None:
            ends = self._last in self.tokenizer.decode([token], skip_special_tokens=True)
            with self._lock:
                self._enders[token] = ends
        return ends

    def done(self, tokens: Sequence[int]) -> bool:
        """Whether the answer ``tokens`` (generated so far, last one new) holds the refusal: check it
        after each new token."""
        if not tokens or not self._may_end(int(tokens[-1])):
            return False
        return self.text in self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def first_stop(self, tokens: Sequence[int]) -> int | None:
        """The length of the shortest prefix of ``tokens`` that holds the refusal, or None."""
        for i in range(len(tokens)):
            if self.done(tokens[: i + 1]):
                return i + 1
        return None

    def cut(self, answer: str) -> str:
        """``answer`` up to the end of the refusal's first occurrence (unchanged without one)."""
        at = answer.find(self.text)
        return answer if at < 0 else answer[: at + len(self.text)]

    def criteria(self, prompt_length: int):
        """A transformers ``StoppingCriteriaList`` ending each row of ``generate`` (prompts
        ``prompt_length`` tokens wide, padding included) at the refusal."""
        stop = self

        class _Refused(StoppingCriteria):
            def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
                new = input_ids[:, prompt_length:].tolist()
                return torch.tensor([stop.done(row) for row in new], dtype=torch.bool, device=input_ids.device)

        return StoppingCriteriaList([_Refused()])
