"""tigeropt: Tiger, Lion, AdaX and Adagrad (standard and GloVe-style) as drop-in torch.optim optimizers.

    from tigeropt import Tiger
    optimizer = Tiger(model.parameters(), lr=1e-3, weight_decay=0.01)   # instead of torch.optim.AdamW
"""

from ._base import TigerOptimizer
from .adagrad import Adagrad
from .adax import AdaX
from .lion import Lion
from .tiger import Tiger, kind_groups

__version__ = "0.1.0"

__all__ = ["Tiger", "Lion", "AdaX", "Adagrad", "TigerOptimizer", "kind_groups", "__version__"]
