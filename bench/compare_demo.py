"""Compare two `make demo` output folders (`python bench/compare_demo.py A B`): the runs
(every tensor, every JSON record except wall-clock fields), the store (every variable and
coordinate, attrs except times; values to the relative difference printed), the report (text
after normalising plotly's random ids, dates and floats to 8 digits; plotly's binary arrays
to a relative tolerance). Prints what differs, or IDENTICAL."""

import base64
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from safetensors.torch import load_file

TIMEY = re.compile(
    r"(wall|time|seconds|created|date|_at$|^since$|elapsed|hours|version|host|pid|command|^out$|path|dir$|per_second)",
    re.I,
)


def strip(o):
    if isinstance(o, dict):
        return {k: strip(v) for k, v in o.items() if not TIMEY.search(str(k))}
    if isinstance(o, list):
        return [strip(v) for v in o]
    return o


def diff_keys(x, y, pre=""):
    if isinstance(x, dict) and isinstance(y, dict):
        r = []
        for k in sorted(set(x) | set(y), key=str):
            if k not in x or k not in y:
                r.append(f"{pre}{k} only in {'B' if k not in x else 'A'}")
            else:
                r += diff_keys(x[k], y[k], f"{pre}{k}.")
        return r
    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
        return [] if (x.shape == y.shape and torch.equal(x, y)) else [f"{pre[:-1]} tensor differs"]
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)) and len(x) == len(y):
        return [
            d
            for i, (u, v) in enumerate(zip(x, y, strict=False))
            for d in diff_keys(u, v, f"{pre}{i}.")
        ]
    return [] if x == y else [f"{pre[:-1]}: {str(x)[:80]} VS {str(y)[:80]}"]


def cmp_runs(a: Path, b: Path, out: list):
    fa = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    if fa != fb:
        out.append(
            f"{a.name}: file lists differ: only A {sorted(set(fa) - set(fb))[:10]} "
            f"only B {sorted(set(fb) - set(fa))[:10]}"
        )
    for rel in sorted(set(fa) & set(fb)):
        pa, pb = a / rel, b / rel
        if rel.endswith(".safetensors"):
            ta, tb = load_file(pa), load_file(pb)
            if ta.keys() != tb.keys():
                out.append(f"{rel}: tensor names differ")
            for k in ta.keys() & tb.keys():
                if not torch.equal(ta[k], tb[k]):
                    out.append(
                        f"{rel}:{k} differs "
                        f"(max {float((ta[k].double() - tb[k].double()).abs().max()):.3g})"
                    )
        elif rel.endswith(".json"):
            ja, jb = strip(json.loads(pa.read_text())), strip(json.loads(pb.read_text()))
            for d in diff_keys(ja, jb):
                out.append(f"{rel}: {d}")
        elif rel.endswith(".jsonl"):
            la = [strip(json.loads(x)) for x in pa.read_text().splitlines() if x.strip()]
            lb = [strip(json.loads(x)) for x in pb.read_text().splitlines() if x.strip()]
            if la != lb:
                n = next(
                    (i for i, (x, y) in enumerate(zip(la, lb, strict=False)) if x != y),
                    min(len(la), len(lb)),
                )
                out.append(
                    f"{rel}: records differ from #{n}: {la[n] if n < len(la) else None} "
                    f"VS {lb[n] if n < len(lb) else None}"
                )
        elif rel.endswith(".pt"):
            sa = torch.load(pa, weights_only=True, map_location="cpu")
            sb = torch.load(pb, weights_only=True, map_location="cpu")
            for d in diff_keys(strip(sa), strip(sb)):
                out.append(f"{rel}: {d}")
        elif pa.read_bytes() != pb.read_bytes():
            out.append(f"{rel}: bytes differ")


def cmp_store(a: Path, b: Path, out: list):
    da, db = xr.open_zarr(a), xr.open_zarr(b)
    if set(da.variables) != set(db.variables):
        out.append(
            f"store: variables only A {sorted(set(da.variables) - set(db.variables))} "
            f"only B {sorted(set(db.variables) - set(da.variables))}"
        )
    if dict(da.sizes) != dict(db.sizes):
        out.append(f"store: sizes {dict(da.sizes)} VS {dict(db.sizes)}")
    for v in sorted(set(da.variables) & set(db.variables)):
        if TIMEY.search(v) or v == "gpu_hours":
            continue
        x, y = da[v], db[v]
        if x.dims != y.dims:
            out.append(f"store:{v} dims {x.dims} VS {y.dims}")
            continue
        xv, yv = x.values, y.values
        if xv.dtype.kind in "fc":
            same = xv.shape == yv.shape and np.array_equal(xv, yv, equal_nan=True)
        else:
            same = xv.shape == yv.shape and np.array_equal(xv, yv)
        if not same:
            msg = ""
            if xv.shape == yv.shape and xv.dtype.kind == "f":
                with np.errstate(invalid="ignore", divide="ignore"):
                    xa, ya = xv.astype(float), yv.astype(float)
                    fin = np.isfinite(xa) & np.isfinite(ya)
                    rel = np.abs(xa - ya)[fin] / np.maximum(
                        np.maximum(np.abs(xa), np.abs(ya))[fin], 1e-300
                    )
                same_pattern = np.array_equal(np.isnan(xa), np.isnan(ya)) and np.array_equal(
                    np.isinf(xa), np.isinf(ya)
                )
                worst = f"{rel.max():.2e}" if rel.size else "n/a"
                msg = f" max rel diff {worst}; nan/inf pattern equal {same_pattern}"
            out.append(f"store:{v} values differ{msg}")
        sa, sb = strip(dict(x.attrs)), strip(dict(y.attrs))
        if json.dumps(sa, sort_keys=True, default=str) != json.dumps(
            sb, sort_keys=True, default=str
        ):
            out.append(f"store:{v} attrs differ {sa} VS {sb}")
    ga, gb = dict(da.attrs), dict(db.attrs)
    for k in ("run_configs",):
        for g in (ga, gb):
            if isinstance(g.get(k), str):
                g[k] = json.loads(g[k])
    for d in diff_keys(strip(ga), strip(gb)):
        out.append(f"store attrs: {d}")


PAT = re.compile(r'"dtype":"(\w+)","bdata":"([^"]*)"')


def norm_report(t):
    t = re.sub(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "UUID", t)
    t = re.sub(r"stores: [^ ]+", "stores: STORE", t)
    return re.sub(
        r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d(:\d\d)?(\.\d+)?( ?UTC|Z|[+-]\d\d:?\d\d)?", "DATE", t
    )


def arrays(chunk):
    return [
        np.frombuffer(base64.b64decode(b.replace("\\u002f", "/")), dtype=np.dtype(d))
        for d, b in PAT.findall(chunk)
    ]


def digits8(text: str) -> str:
    """Decimal floats written in the text rounded to 8 significant digits."""
    return re.sub(r"-?\d+\.\d+(?:e[-+]?\d+)?", lambda m: f"{float(m.group(0)):.8g}", text)


def cmp_report(a: Path, b: Path, out: list, tol: float = 1e-8) -> None:
    """Report text identical after normalising plotly ids, dates and store paths, with every
    binary-encoded plotly array compared numerically (relative tolerance `tol`)."""
    ta, tb = norm_report(a.read_text()), norm_report(b.read_text())
    ca, cb = ta.split('<div id="figure-'), tb.split('<div id="figure-')
    if len(ca) != len(cb):
        out.append(f"report: {len(ca) - 1} figures VS {len(cb) - 1}")
        return
    for i, (x, y) in enumerate(zip(ca, cb, strict=False)):
        fid = "preamble" if i == 0 else "figure-" + x.split('"')[0]
        if digits8(PAT.sub("ARRAY", x)) != digits8(PAT.sub("ARRAY", y)):
            out.append(f"report {fid}: text differs")
        ax, ay = arrays(x), arrays(y)
        if len(ax) != len(ay) or any(u.shape != v.shape for u, v in zip(ax, ay, strict=False)):
            out.append(f"report {fid}: arrays differ in number or shape")
            continue
        worst = 0.0
        for u, v in zip(ax, ay, strict=False):
            if u.dtype.kind != "f":
                worst = max(worst, 0.0 if np.array_equal(u, v) else np.inf)
                continue
            fu, fv = np.isfinite(u), np.isfinite(v)
            if not np.array_equal(fu, fv):
                worst = np.inf
                continue
            d = np.abs(u[fu] - v[fu]) / np.maximum(np.maximum(np.abs(u[fu]), np.abs(v[fu])), 1e-300)
            worst = max(worst, float(d.max()) if d.size else 0.0)
        if worst > tol:
            out.append(f"report {fid}: arrays differ, max relative difference {worst:.3g}")


def main(a, b):
    a, b = Path(a), Path(b)
    out = []
    for run in ("decoder", "relora"):
        cmp_runs(a / run, b / run, out)
    cmp_store(a / "analysis.zarr", b / "analysis.zarr", out)
    cmp_report(a / "report.html", b / "report.html", out)
    print("\n".join(out) if out else "IDENTICAL (modulo wall-clock fields and plotly ids)")
    return 1 if out else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
