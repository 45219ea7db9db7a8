"""dynlab.data: the embedded grammar (training text, held-out domains, minimal pairs)."""

from dynlab.data.grammar import generate_corpus, heldout_domains, minimal_pairs, vocabulary

__all__ = ["generate_corpus", "heldout_domains", "minimal_pairs", "vocabulary"]
