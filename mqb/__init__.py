"""mqb: does your 3D medical segmentation model survive INT8 / INT4 post-training quantization?"""

__version__ = "0.1.0"
