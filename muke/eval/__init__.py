"""What an edit did (docs/ALGORITHM.md §6): greedy generation, both metric families, lm-eval locality and the
reproducibility report."""
