"""Real text for language modelling: corpora split by document, tokenizers, LM batches and the
length-extrapolation evaluation (docs/tasks.md).

    corpus = load_corpus("stdlib")
    data = build_lm_data(corpus, tokenizer="bytes")
    inputs, targets = data.sample(32, 128, generator=torch.Generator().manual_seed(0))
    result = perplexity(model_fn, data.eval_windows(1024, max_windows=64))
"""

from poslab.lab.data.corpora import (
    CORPORA,
    DEFAULT_FRACTIONS,
    SPLITS,
    Corpus,
    CorpusUnavailable,
    Document,
    list_corpora,
    load_corpus,
    split_documents,
    split_of,
)
from poslab.lab.data.token_stream import (
    LMData,
    Perplexity,
    build_lm_data,
    encode_documents,
    eval_windows,
    perplexity,
    sample_windows,
)
from poslab.lab.data.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    build_tokenizer,
    list_tokenizers,
    load_tokenizer,
)

__all__ = [
    "CORPORA",
    "DEFAULT_FRACTIONS",
    "SPLITS",
    "BPETokenizer",
    "ByteTokenizer",
    "Corpus",
    "CorpusUnavailable",
    "Document",
    "LMData",
    "Perplexity",
    "Tokenizer",
    "build_lm_data",
    "build_tokenizer",
    "encode_documents",
    "eval_windows",
    "list_corpora",
    "list_tokenizers",
    "load_corpus",
    "load_tokenizer",
    "perplexity",
    "sample_windows",
    "split_documents",
    "split_of",
]
