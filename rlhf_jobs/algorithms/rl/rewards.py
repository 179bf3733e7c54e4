"""Rewards: what scores a sampled response, behind one interface (`Reward`), for every RL stage.

A reward reads `Responses` (the prompts, the sampled ids, the policy's tokenizer) and returns one score per
response (NaN: no opinion). `RewardModelScore` is a learned reward model's score of the text it was trained
on; Python reward functions and weighted sums of several rewards are others.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from rlhf_jobs.core.prompts import join_response
from rlhf_jobs.engine import optim
from rlhf_jobs.engine.batching import pad
from rlhf_jobs.engine.models import with_bos_tail


@dataclass
class Responses:
    """Sampled responses and the prompts they answer, as every reward reads them."""

    prompts: list[dict[str, Any]]  # `rollout.tokenize_prompts`' examples: input_ids, text (+ the record's columns)
    response: torch.Tensor  # right-padded response ids
    mask: torch.Tensor  # 1 on response tokens up to and including the first EOS
    tokenizer: Any  # the policy's

    def texts(self) -> list[str]:
        """Each response as text (special tokens, EOS included, dropped)."""
        return [self.tokenizer.decode(tokens[: int(length)].tolist(), skip_special_tokens=True)
                for tokens, length in zip(self.response, self.mask.sum(1), strict=True)]


class Reward(Protocol):
    """Scores sampled responses: one float per response, NaN where it has no opinion."""

    name: str  # metrics report it as reward/<name>

    def __call__(self, responses: Responses) -> torch.Tensor: ...


class RewardModelScore:
    """A learned reward model's score of each response, read as it read its training pairs (`reward_model_inputs`).

    `score(input_ids, attention_mask)` runs the model (a frozen sequence classifier, or with LoRA the critic's
    base with its adapter disabled); the reward model's own tokenizer pads and truncates (the tail kept)."""

    name = "model"

    def __init__(self, score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], rm_tokenizer: Any,
                 max_length: int, training: Any, device: torch.device) -> None:
        self.score, self.rm_tokenizer, self.max_length = score, rm_tokenizer, max_length
        self.training, self.device = training, device

    @torch.no_grad()
    def __call__(self, responses: Responses) -> torch.Tensor:
        sequences = reward_model_inputs(responses.tokenizer, self.rm_tokenizer, responses.prompts, responses.response,
                                        responses.mask, self.max_length)
        input_ids, attention_mask = pad(sequences, self.rm_tokenizer.pad_token_id, device=self.device)
        with optim.autocast(self.training, self.device):
            return self.score(input_ids, attention_mask).float()


def reward_model_inputs(tokenizer: Any, rm_tokenizer: Any, prompts: list[dict[str, Any]], response: torch.Tensor,
                        mask: torch.Tensor, max_length: int) -> list[list[int]]:
    """The reward model's token ids for each response: the text its training pairs were made of,
    `join_response(prompt text, response text)` (EOS dropped), in its own tokens with its BOS, the tail kept.

    The join matters: a SentencePiece tokenizer decodes a response's first token without its leading space,
    and "Assistant:" + "Hello" would be scored as "Assistant:Hello" where the RM learnt "Assistant: Hello".
    """
    texts = [
        join_response(prompt["text"], tokenizer.decode(tokens[: int(length)].tolist(), skip_special_tokens=True))
        for prompt, tokens, length in zip(prompts, response, mask.sum(1), strict=True)
    ]
    return [with_bos_tail(rm_tokenizer, ids, max_length)[0]
            for ids in rm_tokenizer(texts, add_special_tokens=False)["input_ids"]]

