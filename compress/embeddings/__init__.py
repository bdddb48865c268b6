"""Sentence embeddings from BERT-family encoders: pooling, the embedder, and embedding evaluations.

- `pooling.py`: how token states become one vector (sentence-transformers' pooling and normalisation
  config when a directory has one, else the mean of the tokens), and the files that carry it;
- `model.py`: `Embedder` (an encoder plus its pooling) and `load_embedder(DIR)`;
- `evaluate.py`: `stsb-embed` (Spearman of cosine similarities against STS-B gold scores) and
  `bbc-news-embed` (nearest-neighbour accuracy of article embeddings).
"""
