"""`muke trace`: causal tracing of edit requests, heat maps and a suggested layer band (muke.locate)."""

from __future__ import annotations

import sys

from muke.cli.common import load_model, model_options
from muke.data import FORMATS


def _preset_window(args) -> int:
    """W of --preset, else of the shipped preset of --model, else 20 (the μKE default)."""
    from muke.workflow.config import load_preset, preset_for_model

    name = args.preset or preset_for_model(args.model)
    return (load_preset(name)[1].get("hparams", {}) if name else {}).get("window", 20)


def cmd_trace(args) -> None:
    """Causal tracing of the requests (muke.locate.trace) → effects.parquet, map.parquet, map_{component}.png
    and band.json in --out (muke.locate.maps). The printed band is the --width layers ending at l_WM, the last
    layer before restoring the question tokens' hidden states brings back less than half of the clean
    log-probability of the first window (where the question's information has left its tokens)."""
    from muke.data import load_requests, select
    from muke.locate.maps import check_components, write_trace
    from muke.locate.trace import TraceConfig, trace

    check_components(args.components)
    em = load_model(args)
    requests = select(load_requests(args.requests, args.format), offset=args.offset, limit=args.limit)
    window = args.window or _preset_window(args)
    cfg = TraceConfig(
        noise=args.noise,
        samples=args.samples,
        seed=args.seed,
        components=tuple(args.components),
        layers=tuple(args.layers) if args.layers else None,
        batch_size=args.batch_size,
        max_target_tokens=args.max_target_tokens,
    )
    effects = trace(em, requests, cfg, window, progress=None if args.quiet else lambda m: print(m, file=sys.stderr))
    band = write_trace(effects, args.out, args.width)
    print(f"suggested layers {band['layers']} (l_WM {band['l_wm']}): {band['rule']}; files in {args.out}")


def add_parsers(sub) -> None:
    from muke.locate.trace import COMPONENTS

    p = sub.add_parser("trace", help="causal tracing: which layers carry the answer (effects, heat maps, a layer band)")
    model_options(p)
    p.add_argument("--requests", required=True, help="file of edit requests")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--offset", type=int, default=0, help="skip the first N requests")
    p.add_argument("--limit", type=int, default=None, help="trace only N requests")
    p.add_argument("--out", required=True, help="folder for effects.parquet, map.parquet, map_*.png, band.json")
    p.add_argument("--preset", help="model preset for the window W (default: the shipped preset of --model)")
    p.add_argument("--window", type=int, help="W: tokens of the first window (default: the preset's, else 20)")
    p.add_argument("--noise", type=float, default=3.0, help="noise std in units of the embeddings' std")
    p.add_argument("--samples", type=int, default=3, help="noise samples per request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--components", nargs="+", default=list(COMPONENTS), choices=COMPONENTS)
    p.add_argument("--layers", type=int, nargs="+", help="layers to restore (default: all)")
    p.add_argument("--batch-size", type=int, default=16, help="restored runs per forward pass")
    p.add_argument("--max-target-tokens", type=int, help="trace the first N answer tokens only (default: all)")
    p.add_argument("--width", type=int, default=5, help="layers in the suggested band")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_trace)
