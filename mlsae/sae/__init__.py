"""Multi-layer TopK sparse autoencoders: model, fast training with exact resume, evaluation.

    from mlsae.sae import SAEConfig, TrainConfig, MLSAE, train_sae, train_many, evaluate_sae

See config.py (hyperparameters and units), model.py (SPEC 2), kernels.py (the sparse
hot path), train.py (TrainState, resume), evaluate.py (SPEC 4 metrics per layer).
"""

from mlsae.sae.config import SAEConfig, TrainConfig
from mlsae.sae.evaluate import LayerMetrics, evaluate_sae, mean_over_layers
from mlsae.sae.model import MLSAE, EncoderOutput, ForwardOutput
from mlsae.sae.train import TrainingInterrupted, TrainResult, TrainState, train_many, train_sae

__all__ = ["SAEConfig", "TrainConfig", "MLSAE", "EncoderOutput", "ForwardOutput", "train_sae",
           "train_many", "TrainingInterrupted", "TrainResult", "TrainState", "evaluate_sae",
           "LayerMetrics", "mean_over_layers"]
