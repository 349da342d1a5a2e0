"""Helpers the analyses share (none is an analysis, none is registered): output files and
figures (common), k-means and t-SNE (clusters), sentence embeddings (embeddings), the edit's
influence curves (influence), the persona form parser (persona_parse)."""
