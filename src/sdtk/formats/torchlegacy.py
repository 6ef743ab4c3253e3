"""Legacy stacked-pickle torch files (torch < 1.6) and plain pickles."""
from sdtk.errors import UnsupportedFormatError


def read_torch_legacy(path):
    raise UnsupportedFormatError(path, "legacy PyTorch files are not supported yet")


def read_plain_pickle(path):
    raise UnsupportedFormatError(path, "plain pickle files are not supported yet")
