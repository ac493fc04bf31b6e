"""tigeropt: Tiger, Lion, AdaX and Adagrad (standard and GloVe-style) as drop-in torch.optim optimizers.

    from tigeropt import Tiger
    optimizer = Tiger(model.parameters(), lr=1e-3, weight_decay=0.01)   # instead of torch.optim.AdamW
"""

from . import gan
from ._base import TigerOptimizer
from .adagrad import Adagrad
from .adax import AdaX
from .factory import available_optimizers, create_optimizer, register_optimizer
from .gan import GradNormCritic, gradient_penalty
from .in_backward import OptimizerInBackward, optimizer_in_backward
from .lazy import LazyOptimizer, embedding_weights
from .lion import Lion
from .mixed import MixedOptimizer, split_embeddings
from .param_groups import DEFAULT_NO_DECAY, describe, param_groups
from .suggest import suggest_hparams
from .tiger import Tiger, kind_groups
from .zero import attach_zero

__version__ = "0.1.0"

__all__ = [
    "Tiger", "Lion", "AdaX", "Adagrad", "TigerOptimizer", "kind_groups",
    "LazyOptimizer", "embedding_weights", "MixedOptimizer", "split_embeddings",
    "optimizer_in_backward", "OptimizerInBackward", "attach_zero",
    "GradNormCritic", "gradient_penalty", "gan",
    "param_groups", "describe", "DEFAULT_NO_DECAY", "suggest_hparams",
    "create_optimizer", "register_optimizer", "available_optimizers",
    "__version__",
]
