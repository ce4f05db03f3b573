"""Building blocks for plugin authors (anchors, box coding, matching, sampling, RoI pooling, losses,
modulated deformable convolution)."""

from segkit.ops.anchors import AnchorGenerator, cell_anchors, octave_anchor_sizes
from segkit.ops.box_coder import BoxCoder
from segkit.ops.deform_conv import ModulatedDeformConv2d
from segkit.ops.default_boxes import DefaultBoxGenerator, ssd_scales
from segkit.ops.labels import check_labels, check_num_classes
from segkit.ops.losses import sigmoid_focal_loss, sigmoid_focal_loss_by_label, smooth_l1_loss
from segkit.ops.matcher import ATSSMatcher, Matcher
from segkit.ops.conv import conv_norm_act
from segkit.ops.norm import NORMS, check_norm, fixed_affine, fold_conv_norm, make_norm
from segkit.ops.poolers import MultiLevelRoIAlign, assign_boxes_to_levels, boxes_to_rois
from segkit.ops.sampler import BalancedSampler
from segkit.ops.shape_spec import ShapeSpec, shared_channels

__all__ = [
    "ATSSMatcher",
    "AnchorGenerator",
    "BalancedSampler",
    "BoxCoder",
    "DefaultBoxGenerator",
    "Matcher",
    "ModulatedDeformConv2d",
    "MultiLevelRoIAlign",
    "NORMS",
    "ShapeSpec",
    "shared_channels",
    "assign_boxes_to_levels",
    "boxes_to_rois",
    "cell_anchors",
    "octave_anchor_sizes",
    "check_labels",
    "check_norm",
    "check_num_classes",
    "conv_norm_act",
    "fixed_affine",
    "fold_conv_norm",
    "make_norm",
    "sigmoid_focal_loss",
    "sigmoid_focal_loss_by_label",
    "smooth_l1_loss",
    "ssd_scales",
]
