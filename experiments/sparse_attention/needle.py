"""Needle in a haystack per selector and budget on the default model (`workbench.attention.needle`): a code
placed early (10%) or midway (50%) in a long held-out document of the corpus, asked for at the end; the
document is prefilled densely and the answer decoded under each selector, teacher-forced.

    .venv/bin/python experiments/sparse_attention/needle.py                       # 2k/4k/8k, 2 depths, 3 codes
    .venv/bin/python experiments/sparse_attention/needle.py --lengths 2048 --codes 1   # a quick look
    .venv/bin/python experiments/sparse_attention/needle.py --report-only          # figure + table from the JSON

Outputs: needle.json (every point, with versions), needle.html / needle.png (`workbench.viz.needle_figure`:
a heat map per length), and the table printed (codes found / points, the answer's mean log p).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

HERE = Path(__file__).resolve().parent


def table(result: dict) -> str:
    from workbench.attention.needle import needle_summary
    by = {(r["length"], r["policy"]): r for r in needle_summary(result)}
    lengths = result["lengths"]
    lines = ["| policy | " + " | ".join(f"{n} tokens: found / log p" for n in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for pol in dict.fromkeys(p["policy"] for p in result["points"]):
        cells = [f"{by[n, pol]['found']}/{by[n, pol]['n']} / {by[n, pol]['logprob']:.2f}" if (n, pol) in by else "-"
                 for n in lengths]
        lines.append(f"| {pol} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="2048,4096,8192")
    ap.add_argument("--depths", default="0.1,0.5", help="where the needle sits, as a share of the document")
    ap.add_argument("--codes", type=int, default=3, help="random codes per (length, depth)")
    ap.add_argument("--budgets", default="64,256,1024")
    ap.add_argument("--out", default=str(HERE / "needle.json"))
    ap.add_argument("--report-only", action="store_true", help="figure and table from --out, no model run")
    args = ap.parse_args()
    from workbench.viz import needle_figure
    out = Path(args.out)
    if args.report_only:
        result = json.loads(out.read_text())
    else:
        from workbench import Engine
        from workbench.attention.needle import needle_probe
        engine = Engine.from_pretrained("default", device="cpu")
        result = needle_probe(engine, [int(x) for x in args.lengths.split(",")],
                              [float(x) for x in args.depths.split(",")], args.codes,
                              [int(x) for x in args.budgets.split(",")], progress=print)
        out.write_text(json.dumps(result, indent=1) + "\n")
    fig = needle_figure(result)
    fig.write_html(out.with_suffix(".html"), include_plotlyjs="cdn")
    try:
        fig.write_image(out.with_suffix(".png"), scale=2)
    except Exception as e:  # noqa: BLE001 - a static image needs kaleido and a browser; the HTML is the figure
        print(f"needle: no PNG ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
    print(table(result))


if __name__ == "__main__":
    main()
