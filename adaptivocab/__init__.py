"""AdaptiVocab: domain n-gram vocabularies for a base tokenizer and model.

`PatchTokenizer` (build / encode / decode / save), `is_patch_tokenizer_dir`, and the
`python -m adaptivocab {build,patch-model,finetune,evaluate}` commands. Depends on
tokenizers / transformers / torch / safetensors / numpy only; never on the engine.
"""
from adaptivocab.patch_tokenizer import PATCH_TOKENIZER_FILE, PatchTokenizer, is_patch_tokenizer_dir

__all__ = ["PATCH_TOKENIZER_FILE", "PatchTokenizer", "is_patch_tokenizer_dir"]
