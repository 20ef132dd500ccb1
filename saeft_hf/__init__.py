"""saeft-hf: SAE-regularised robust fine-tuning of CLIP vision models on the Hugging Face stack."""

__version__ = "0.1.0"

from .penalty import SAEFTPenalty, feature_distillation_penalty, l2sp_penalty, sae_ft_penalty
from .sae import SAEConfig, SAELoadError, SAEMismatchError, SAEOutput, SparseAutoencoder
from .sae_training import SAETrainingResult, evaluate_sae, train_sae

__all__ = [
    "SAEConfig",
    "SAEFTPenalty",
    "SAELoadError",
    "SAEMismatchError",
    "SAEOutput",
    "SAETrainingResult",
    "SparseAutoencoder",
    "evaluate_sae",
    "feature_distillation_penalty",
    "l2sp_penalty",
    "sae_ft_penalty",
    "train_sae",
]
