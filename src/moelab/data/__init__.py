"""Data for the training lab: corpora (embedded stdlib code + prose, text, JSONL, Hugging Face),
tokenizers (byte-level BPE, bytes) and packed loaders (resumable training stream, per-domain eval)."""

# Names resolve lazily (moelab._lazy): importing moelab.data.corpus does not load torch via this package.
from moelab._lazy import lazy_exports as _lazy_exports

_EXPORTS = {
    "CorpusSplits": "moelab.data.corpus",
    "DataConfig": "moelab.data.corpus",
    "Document": "moelab.data.corpus",
    "load_corpus": "moelab.data.corpus",
    "Batch": "moelab.data.loader",
    "TokenizedDocs": "moelab.data.loader",
    "TrainStream": "moelab.data.loader",
    "eval_batches": "moelab.data.loader",
    "tokenize_documents": "moelab.data.loader",
    "PreparedData": "moelab.data.pipeline",
    "prepare_data": "moelab.data.pipeline",
    "Tokenizer": "moelab.data.tokenizer",
    "train_tokenizer": "moelab.data.tokenizer",
}
__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS, module_globals=globals())

__all__ = [
    "Batch", "CorpusSplits", "DataConfig", "Document", "PreparedData", "TokenizedDocs", "Tokenizer",
    "TrainStream", "eval_batches", "load_corpus", "prepare_data", "tokenize_documents", "train_tokenizer",
]
