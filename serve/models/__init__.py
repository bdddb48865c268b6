"""Model implementations of the serving runtime (Gemma 2 and Gemma 3 text decoders)."""
