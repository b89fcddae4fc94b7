"""Data layer: COCO / VOC / CSV readers, splits, decoding, transforms, mixing and loaders (plain PyTorch)."""

from q2l.data.batch import Batch
from q2l.data.build import DataSplits, build_datasets
from q2l.data.dataset import MultiLabelDataset
from q2l.data.device_decode import DeviceDecodedLoader, DeviceDecoder, EncodedBatch, EncodedCollate
from q2l.data.images import BadImageError, check_image_size, decode_rgb, decode_rgb_bytes
from q2l.data.loaders import build_loader
from q2l.data.mixing import mix_batch
from q2l.data.table import DataError

__all__ = [
    "Batch",
    "BadImageError",
    "DataError",
    "DataSplits",
    "DeviceDecodedLoader",
    "DeviceDecoder",
    "EncodedBatch",
    "EncodedCollate",
    "MultiLabelDataset",
    "build_datasets",
    "build_loader",
    "check_image_size",
    "decode_rgb",
    "decode_rgb_bytes",
    "mix_batch",
]
