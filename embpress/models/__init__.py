"""CTR model heads that take any compressed table (DLRM, DCN-v2, Wide & Deep, DeepFM)."""

from embpress.models.base import CTRModel, build_model, register_model, registered_models
from embpress.models.dcn import DCNv2
from embpress.models.deepfm import DeepFM
from embpress.models.dlrm import DLRM
from embpress.models.wdl import WideDeep

__all__ = ["CTRModel", "DCNv2", "DLRM", "DeepFM", "WideDeep", "build_model", "register_model", "registered_models"]
