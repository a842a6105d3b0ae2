"""The critic: the policy's LM backbone with a scalar value head.

It is HF's ``AutoModelForTokenClassification`` with one label: the decoder stack of the policy
checkpoint (its LM head is dropped) followed by ``score = Linear(hidden, 1)`` at every position.
Initialised from a causal-LM checkpoint, the backbone is copied and the head is drawn fresh
(normal, std ``initializer_range``, zero bias) from torch's global RNG, so seed it first. Saved
with ``save_pretrained`` it is an ordinary HF directory (``architectures:
["LlamaForTokenClassification"]``, ``num_labels: 1``) that ``load_value_model`` reads back with
its head.

Alignment (see ``rl.backend``): ``values[:, i] = V(tokens[:i+1])``, the value of the state
after token ``i`` has been appended. A causal decoder's hidden state at position ``i`` has seen
exactly ``tokens[:i+1]``, so the head's output at position ``i`` is that value; no shift.
"""

from __future__ import annotations

import os

import torch
from torch import nn

VALUE_HEAD = "score"
"""Name of the head module (HF's token-classification head)."""


def is_value_checkpoint(config) -> bool:
    """Whether an HF config describes a saved critic (token classification, one label)."""
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith("ForTokenClassification") for a in archs) and getattr(config, "num_labels", 0) == 1


def load_value_model(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> nn.Module:
    """The critic from ``path``: a saved critic (head restored) or a causal-LM checkpoint (fresh head).

    Dropout is switched off: the critic is a regression target in RL, where stochastic values
    would add noise to GAE and to the value clipping.
    """
    from transformers import AutoConfig, AutoModelForTokenClassification
    from transformers.utils import logging as hf_logging

    config = AutoConfig.from_pretrained(path)
    fresh_head = not is_value_checkpoint(config)
    if fresh_head:
        if type(config) not in AutoModelForTokenClassification._model_mapping:
            raise ValueError(
                f"critic: {path} is a {type(config).__name__} checkpoint, and transformers has no "
                "token-classification class for it, so no value head can be put on it. Use a "
                "Llama/Qwen/Mistral-family checkpoint for the critic (model.critic_path)."
            )
        config.num_labels = 1
        config.id2label = {0: "value"}
        config.label2id = {"value": 0}
    config.classifier_dropout = 0.0
    verbosity = hf_logging.get_verbosity()
    if fresh_head:
        hf_logging.set_verbosity_error()  # its load report lists the new head as "missing": expected
    try:
        model = AutoModelForTokenClassification.from_pretrained(path, config=config, dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
    disable_dropout(model)
    return model


def disable_dropout(model: nn.Module) -> None:
    """Zero every dropout in ``model`` (modules and HF attention's functional dropout).

    RL recomputes log-probabilities and values and compares them with earlier ones; dropout
    would make the two differ for the same weights.
    """
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


def compute_values(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Critic values, fp32.

    Args:
        input_ids: (b, t) right-padded token ids.
        attention_mask: (b, t), 1 on real tokens.

    Returns:
        values: (b, t), ``values[:, i] = V(tokens[:i+1])``; 0.0 at padded positions.
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    values = out.logits.squeeze(-1).float()
    return values * attention_mask.to(values.dtype)
