"""A small causal language model written against the transformers PreTrainedModel API."""

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput


class TinyLMConfig(PretrainedConfig):
    model_type = "hfl_tiny_lm"

    def __init__(
        self, vocab_size=32, hidden_size=16, num_layers=2, tie_word_embeddings=True, **kwargs
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


class TinyLMForCausalLM(PreTrainedModel):
    """Embedding, residual tanh layers, a layer norm and an output head tied to the embedding."""

    config_class = TinyLMConfig
    _tied_weights_keys = {"lm_head.weight": "embed.weight"}

    def __init__(self, config):
        super().__init__(config)
        width = config.hidden_size
        self.embed = nn.Embedding(config.vocab_size, width)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids):
        hidden = self.embed(input_ids)
        for layer in self.layers:
            hidden = hidden + torch.tanh(layer(hidden))
        return CausalLMOutput(logits=self.lm_head(self.norm(hidden)))
