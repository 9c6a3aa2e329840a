"""initstudy: how weight initialisation changes the training of the seed document's LeNet."""

__version__ = "0.1.0"

from .config import RunConfig
from .model import LeNet
from .schemes import SCHEMES, apply_scheme
from .training import train

__all__ = ["LeNet", "apply_scheme", "RunConfig", "train", "SCHEMES", "__version__"]
