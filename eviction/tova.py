"""TOVA (Oren et al. 2024): keep the tokens the current (last) query attends to most.

Applied here at the end of prefill with the last prompt query; generated tokens are appended.
"""

from __future__ import annotations

import dataclasses

from eviction.base import Policy


@dataclasses.dataclass(frozen=True)
class TOVA(Policy):
    name = "tova"
    budget: float = 0.1

    def static_keep(self, prompt_len):
        return self.n_attend(prompt_len)

    def prompt_attention(self, prompt_len):
        return 1, "sum"
