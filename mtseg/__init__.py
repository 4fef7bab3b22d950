"""mtseg: multi-task segmentation on COCO at cluster scale."""

__version__ = "0.1.0"
