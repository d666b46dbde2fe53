"""The `detectron2` backend: any detectron2 panoptic model (default Panoptic FPN R101, COCO) behind the interface.

detectron2 is not on any package registry, so it is optional: it is imported only when this backend is created, and
a missing install raises an ImportError that says how to install it from its official source. The conversion of
detectron2's panoptic output to a `Segmentation` is a pure function, tested without detectron2.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
import torch

from spatext.pipeline.records import Sample, Segment, Segmentation
from spatext.pipeline.segmenters.base import RANDOM_INIT_LABEL, Segmenter, SegmenterSpec, autocast, clean_segmentation

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = "COCO-PanopticSegmentation/panoptic_fpn_R_101_3x.yaml"
INSTALL_HINT = (
    "--segmenter detectron2 needs detectron2, which is not on PyPI. Install it from its official source, matching "
    "your torch build: pip install 'git+https://github.com/facebookresearch/detectron2.git' (needs a C++ compiler; "
    "see https://detectron2.readthedocs.io/en/latest/tutorials/install.html), or use --segmenter mask2former."
)


def import_detectron2():
    """The detectron2 package, or an ImportError carrying the install hint."""
    try:
        import detectron2  # noqa: F401
        from detectron2 import model_zoo
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    return model_zoo


def panoptic_to_segmentation(
    panoptic_seg: np.ndarray, segments_info: Sequence[dict], thing_classes: Sequence[str], stuff_classes: Sequence[str]
) -> Segmentation:
    """detectron2's (panoptic_seg, segments_info) -> Segmentation with class names as labels.

    Things index `thing_classes` and stuff indexes `stuff_classes` by `category_id`; stuff has no score (None).
    """
    segments = []
    for info in segments_info:
        names = thing_classes if info.get("isthing") else stuff_classes
        category = int(info["category_id"])
        label = names[category] if 0 <= category < len(names) else str(category)
        score = info.get("score")
        segments.append(Segment(id=int(info["id"]), label=label, score=None if score is None else float(score)))
    return clean_segmentation(np.asarray(panoptic_seg), segments)


def _load_config(spec: SegmenterSpec):
    """A detectron2 CfgNode from a model zoo name or a local yaml, with weights and device set."""
    model_zoo = import_detectron2()
    from detectron2.config import get_cfg

    config = spec.config or DEFAULT_CONFIG
    cfg = get_cfg()
    cfg.merge_from_file(config if os.path.isfile(config) else model_zoo.get_config_file(config))
    if spec.weights and spec.weights != "none":
        cfg.MODEL.WEIGHTS = spec.weights
    elif spec.weights is None:
        cfg.MODEL.WEIGHTS = model_zoo.get_checkpoint_url(config)
    cfg.MODEL.DEVICE = spec.device
    cfg.MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH = spec.threshold
    cfg.MODEL.PANOPTIC_FPN.COMBINE.OVERLAP_THRESH = spec.overlap_threshold
    cfg.freeze()
    return cfg


class Detectron2Segmenter(Segmenter):
    """A detectron2 panoptic model, run batched on `spec.device`."""

    name = "detectron2"

    def __init__(self, spec: SegmenterSpec) -> None:
        """Build the model from the config and load its checkpoint (or keep random weights for `none`)."""
        cfg = _load_config(spec)
        import detectron2.data.transforms as T
        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.data import MetadataCatalog
        from detectron2.modeling import build_model

        self.cfg, self.model = cfg, build_model(cfg).eval()
        if spec.weights == "none":
            self.weights_label = RANDOM_INIT_LABEL
            logger.warning("detectron2 %s: pretrained: %s", spec.config or DEFAULT_CONFIG, RANDOM_INIT_LABEL)
        else:
            DetectionCheckpointer(self.model).load(cfg.MODEL.WEIGHTS)
            self.weights_label = cfg.MODEL.WEIGHTS
        min_size = spec.processor_size or cfg.INPUT.MIN_SIZE_TEST
        self.resize = T.ResizeShortestEdge([min_size, min_size], cfg.INPUT.MAX_SIZE_TEST)
        metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0]) if cfg.DATASETS.TEST else None
        self.thing_classes = list(getattr(metadata, "thing_classes", []) or [])
        self.stuff_classes = list(getattr(metadata, "stuff_classes", []) or [])

    def segment(self, samples: Sequence[Sample]) -> list[Segmentation]:
        """One batched forward over the samples' images, then the panoptic outputs converted."""
        inputs = []
        for sample in samples:
            image = sample.image[:, :, ::-1] if self.cfg.INPUT.FORMAT == "BGR" else sample.image
            height, width = image.shape[:2]
            resized = self.resize.get_transform(image).apply_image(np.ascontiguousarray(image))
            tensor = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
            inputs.append({"image": tensor, "height": height, "width": width})
        with torch.inference_mode(), autocast(self.spec):
            outputs = self.model(inputs)
        results = []
        for output in outputs:
            panoptic_seg, segments_info = output["panoptic_seg"]
            results.append(
                panoptic_to_segmentation(panoptic_seg.cpu().numpy(), segments_info, self.thing_classes,
                                         self.stuff_classes)
            )
        return results
