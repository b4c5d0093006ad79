"""Data for the training lab: corpora (embedded stdlib code + prose, text, JSONL, Hugging Face),
tokenizers (byte-level BPE, bytes) and packed loaders (resumable training stream, per-domain eval)."""

from moelab.data.corpus import CorpusSplits, DataConfig, Document, load_corpus
from moelab.data.loader import Batch, TokenizedDocs, TrainStream, eval_batches, tokenize_documents
from moelab.data.pipeline import PreparedData, prepare_data
from moelab.data.tokenizer import Tokenizer, train_tokenizer

__all__ = [
    "Batch", "CorpusSplits", "DataConfig", "Document", "PreparedData", "TokenizedDocs", "Tokenizer",
    "TrainStream", "eval_batches", "load_corpus", "prepare_data", "tokenize_documents", "train_tokenizer",
]
