"""Interoperate with other tools' autoencoder formats (docs/interop.md).

| module | one job |
| --- | --- |
| `errors.py` | `InteropError`: a file to import or export is wrong (the message names the fix) |
| `weights.py` | `Weights`: a TopK SAE's tensors in mlsae's orientation; to and from `MLSAE` |
| `tensors.py` | read a safetensors file whole or fail with a clear message (header checked first) |
| `paper.py` | the paper's released MLSAE format (tim-lawson/mlsae): read, write, convert |
| `saelens.py` | SAELens' TopK format (cfg.json + sae_weights.safetensors): write, read |
| `sparsify.py` | EleutherAI sparsify's per-hookpoint format (cfg.json + sae.safetensors): write, read |
| `imports.py` | `mlsae import`: resolve a source (local or hub), check it against the model, save it into a warehouse |
| `exports.py` | `mlsae export`: one warehouse autoencoder to a format, for one layer |
"""

from mlsae.interop.errors import InteropError

__all__ = ["InteropError"]
