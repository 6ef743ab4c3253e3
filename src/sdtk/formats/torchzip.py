"""PyTorch zip checkpoints (.ckpt .pt .pth .bin) through our own restricted pickle interpreter."""
from sdtk.errors import UnsupportedFormatError


def read_torchzip(path):
    raise UnsupportedFormatError(path, "PyTorch zip checkpoints are not supported yet")
