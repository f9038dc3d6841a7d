"""The δ engine (paper §3, docs/ALGORITHM.md §2–4): windows, objectives, hooks, the shifted forward passes
(forward, batched), the affinity λ (affinity) and the δ loops (memory) that turn one edit request into
target memories z = h + δ."""
