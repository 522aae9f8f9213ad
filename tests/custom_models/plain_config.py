"""A PretrainedConfig subclass for ConfigNet, shipped as it is instead of a generated one."""

from transformers import PretrainedConfig


class ConfigNetConfig(PretrainedConfig):
    model_type = "hfl_config_net"

    def __init__(self, in_features=3, out_features=5, **kwargs):
        self.in_features = in_features
        self.out_features = out_features
        super().__init__(**kwargs)
