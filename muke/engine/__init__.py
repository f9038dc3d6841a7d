"""The δ engine (paper §3, ALGORITHM §2–4): windows, objectives, hooks, the shifted forward passes and
the δ loops that turn one edit request into target memories z = h + δ."""
