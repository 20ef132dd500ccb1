"""saeft-hf: SAE-regularised robust fine-tuning of CLIP vision models on the Hugging Face stack."""

__version__ = "0.1.0"

from .config import SAEFTConfig
from .modeling import SAEFTCLIPConfig, SAEFTCLIPForImageClassification  # also registers the Auto classes
from .penalty import SAEFTPenalty, feature_distillation_penalty, l2sp_penalty, sae_ft_penalty
from .sae import SAEConfig, SAELoadError, SAEMismatchError, SAEOutput, SparseAutoencoder
from .sae_training import SAETrainingResult, evaluate_sae, train_sae
from .trainer import SAEFTTrainer
from .validation import SAEFTConfigError

__all__ = [
    "SAEConfig",
    "SAEFTCLIPConfig",
    "SAEFTCLIPForImageClassification",
    "SAEFTConfig",
    "SAEFTConfigError",
    "SAEFTPenalty",
    "SAEFTTrainer",
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
