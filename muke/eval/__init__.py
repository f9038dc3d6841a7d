"""What an edit did (ALGORITHM §6): greedy generation, both metric families, lm-eval locality and the
reproducibility report."""
