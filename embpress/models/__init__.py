"""CTR model heads that take any compressed table (DLRM, DCN-v2, ...)."""

from embpress.models.base import CTRModel, build_model, register_model, registered_models
from embpress.models.dcn import DCNv2
from embpress.models.dlrm import DLRM

__all__ = ["CTRModel", "DCNv2", "DLRM", "build_model", "register_model", "registered_models"]
