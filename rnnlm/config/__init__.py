"""The run configuration: the tree of dataclasses (schema.py), its loading from YAML and
`--set` overrides (loading.py), and every check of it, asking the models what they support
(checks.py).

May import: rnnlm.errors, and (checks.py) rnnlm.models and rnnlm.kernels. Importing this
package does not import torch: the checks load with the first config.
"""

from rnnlm.config.loading import config_from_dict, load_config, parse_override
from rnnlm.config.schema import Config, DataConfig, ModelConfig, TrainConfig, dump_yaml
from rnnlm.errors import ConfigError

__all__ = ["Config", "ConfigError", "DataConfig", "ModelConfig", "TrainConfig",
           "config_from_dict", "dump_yaml", "load_config", "parse_override"]
