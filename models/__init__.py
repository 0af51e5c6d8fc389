"""The ResNet family as MindSpore Cells: ResNet, ResNeXt, Res2Net (incl. v1b) and ResNeSt."""
from resgarden.platform import apply_cpu_speed_guard, fix_checkpoint_memory_check, quiet_cell_teardown

apply_cpu_speed_guard()  # before MindSpore builds a kernel: see resgarden/platform.py
fix_checkpoint_memory_check()
quiet_cell_teardown()

from . import res2net, resnest, resnet  # noqa: E402,F401  (registers the variants)
from .registry import (  # noqa: E402
    Card,
    check_model_name,
    create_model,
    list_models,
    model_card,
    model_family,
    register_model,
    zoo_table,
)
from .resnet import ResNet  # noqa: E402

__all__ = ["Card", "ResNet", "check_model_name", "create_model", "list_models", "model_card", "model_family",
           "register_model", "zoo_table"]
