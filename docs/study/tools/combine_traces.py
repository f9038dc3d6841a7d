"""The maps and band of several `muke trace` folders together (docs/STUDY-smollm2.md, "Causal tracing").

    python docs/study/tools/combine_traces.py OUT DIR [DIR ...]

Concatenates their effects.parquet and writes OUT as `muke trace` does (muke.locate.maps.write_trace);
prints the band and, per component, how many requests each map pools.
"""

import sys

import pandas as pd

from muke.locate.maps import write_trace

out, *folders = sys.argv[1:]
effects = pd.concat([pd.read_parquet(f"{d}/effects.parquet") for d in folders], ignore_index=True)
band = write_trace(effects, out)
print({k: v for k, v in band.items() if k != "curve"})
print(effects.groupby("component")["id"].nunique().to_dict())
