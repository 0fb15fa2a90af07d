"""FDNM model: two-stream ResNet backbone, frequency modules (AGP, ANM) and the BNNeck head."""

from fdnm_jax.models.fdnm import FDNM
from fdnm_jax.models.fdnm import FDNMTiny
from fdnm_jax.models.fdnm import fdnm_from_config
from fdnm_jax.models.frequency import AGP
from fdnm_jax.models.frequency import ANM
from fdnm_jax.models.resnet import ResNet
from fdnm_jax.models.resnet import ResNet50
from fdnm_jax.models.resnet import ResNetTiny

__all__ = ["AGP", "ANM", "FDNM", "FDNMTiny", "ResNet", "ResNet50", "ResNetTiny", "fdnm_from_config"]
