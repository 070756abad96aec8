from fusionprof.models.model import (
    FusionHead,
    FusionModel,
    allow_recompiles,
    build_model,
    compile_regions,
    count_parameters,
    forward_flops,
    repeated_blocks,
)
from fusionprof.models.registry import create_fusion, fusion_names, register_fusion

__all__ = ["FusionHead", "FusionModel", "allow_recompiles", "build_model", "compile_regions", "count_parameters",
           "create_fusion", "forward_flops", "fusion_names", "register_fusion", "repeated_blocks"]
