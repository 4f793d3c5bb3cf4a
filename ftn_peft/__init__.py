"""ftn_peft: Factorized Tensor Networks as a PEFT tuner.

Importing the package registers the method "FTN" in PEFT, so `get_peft_model`, `PeftConfig.from_pretrained`,
`PeftModel.from_pretrained` and the `AutoPeftModel*` classes handle FTN adapters like built-in ones.
"""

from . import compat as _compat
from . import loading as _loading
from . import saving as _saving
from .config import FTNConfig
from .layer import BASE_ADAPTER, FTNLayer
from .model import FTNModel
from .peft_type import FTN_PEFT_TYPE, PREFIX, FTNPeftType
from .task_layers import TaskHead, TaskNorm

__version__ = "0.1.0"


def _register() -> None:
    # PEFT's register_peft_method only accepts members of its own PeftType enum, so the tables are filled directly,
    # exactly as register_peft_method would fill them (see peft_type.py for why a str-enum member works).
    if FTN_PEFT_TYPE in _compat.PEFT_TYPE_TO_TUNER_MAPPING:
        return
    _compat.PEFT_TYPE_TO_CONFIG_MAPPING[FTN_PEFT_TYPE] = FTNConfig
    _compat.PEFT_TYPE_TO_TUNER_MAPPING[FTN_PEFT_TYPE] = FTNModel
    _compat.PEFT_TYPE_TO_PREFIX_MAPPING[FTN_PEFT_TYPE] = PREFIX
    _compat.install()
    _saving.install()
    _loading.install()


_register()

from . import presets  # noqa: E402  (presets build FTNConfigs, which need the registration above)
from .auto import auto_config  # noqa: E402
from .report import ParameterReport, parameter_report  # noqa: E402
from .serving import forward_all_tasks  # noqa: E402
from .weight_cache import clear_inference_cache, inference_cache_bytes, set_inference_cache  # noqa: E402

__all__ = [
    "BASE_ADAPTER",
    "FTNConfig",
    "FTNLayer",
    "FTNModel",
    "FTNPeftType",
    "FTN_PEFT_TYPE",
    "ParameterReport",
    "TaskHead",
    "TaskNorm",
    "auto_config",
    "clear_inference_cache",
    "forward_all_tasks",
    "inference_cache_bytes",
    "parameter_report",
    "presets",
    "set_inference_cache",
]
