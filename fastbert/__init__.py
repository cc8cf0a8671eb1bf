"""fastbert: fused GPU kernels (Triton and CUDA C++) for fine-tuning BERT.

    import fastbert
    model = fastbert.BertModel.from_pretrained("default")     # embedded all-MiniLM-L6-v2
    tokenizer = fastbert.Tokenizer.from_pretrained("default")
    out = model(**tokenizer(["a sentence", "another one"]))

Every fusable step runs through fastbert.ops, whose backend ("torch",
"triton", "cuda") is chosen per call from the device, or by
fastbert.ops.use_backend(...).

A transformers BERT runs on the same kernels after `fastbert.patch_transformers(model)`; a model
fine-tuned by `fastbert finetune` answers raw inputs through `fastbert.Predictor.from_pretrained(path)`.
"""
from . import ops
from .config import BertConfig
from .defaults import default_model_path
from .model import BertModel, BertOutput
from .transformers_integration import patch_transformers
from .tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = ["BertConfig", "BertModel", "BertOutput", "Predictor", "Tokenizer", "default_model_path", "ops",
           "patch_transformers"]


def __getattr__(name):
    # imported when first used: it brings the task, data and metric modules, which inference of the
    # bare encoder does not need
    if name == "Predictor":
        from .predictor import Predictor
        return Predictor
    raise AttributeError(f"module 'fastbert' has no attribute {name!r}")
