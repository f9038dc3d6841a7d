"""The batch weight update (docs/ALGORITHM.md §5): second-moment statistics, the MEMIT / AlphaEdit / UnKE
backends (by name: `backends.BACKENDS`) that map target memories z to a weight update ΔW, and applying,
reverting and exporting ΔW."""
