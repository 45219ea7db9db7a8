"""The "Claims" section of the HTML report: one row per claim of a study (effect size, 95%
confidence interval across seeds, number of seeds, method, verdict), from the dicts of
`dynlab.experiment.claims.ClaimResult.as_dict`."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence

COLOURS = {"supported": "#1a7f37", "contradicted": "#c0392b", "inconclusive": "#9a6700"}


def _num(v: object) -> str:
    if not isinstance(v, int | float) or not math.isfinite(float(v)):
        return "–"
    return f"{float(v):.3g}"


def claims_html(claims: Sequence[Mapping]) -> str:
    """The Claims section (heading, rule, table) as HTML; '' for no claims."""
    if not claims:
        return ""
    level = claims[0].get("verdict_level", 0.95)
    head = "".join(f"<th>{c}</th>" for c in ("claim", "scale", "effect (R − D)", "95% CI",
                                              "seeds", "method", "verdict"))
    rows = []
    for c in claims:
        colour = COLOURS.get(str(c.get("verdict")), "#222")
        note = (f'<br><span class="claim-note">{html.escape(str(c["note"]))}</span>'
                if c.get("note") else "")
        rows.append(
            f'<tr data-claim="{html.escape(str(c.get("id")))}">'
            f"<td>{html.escape(str(c.get('claim')))}{note}</td>"
            f"<td>{html.escape(str(c.get('scale')))}</td><td>{_num(c.get('effect'))}</td>"
            f"<td>[{_num(c.get('lo'))}, {_num(c.get('hi'))}]</td><td>{c.get('n')}</td>"
            f"<td>{html.escape(str(c.get('method')))}</td>"
            f'<td style="color:{colour};font-weight:600">{html.escape(str(c.get("verdict")))}'
            "</td></tr>")
    rule = ("Effect: ReLoRA minus decoder (difference of means, paired by seed), a one-sample "
            "mean of ReLoRA's runs, or a bootstrap median, as the method says; 95% confidence "
            "interval across seeds. Verdict: supported (contradicted) when the interval at the "
            f"family level {float(level):.4g} (Bonferroni over the claims with an interval) "
            "lies entirely on the claimed (the other) side, else inconclusive at that number of "
            "seeds.")
    return ('<section class="claims"><h2>Claims</h2>'
            f'<p class="caption">{html.escape(rule)}</p>'
            f'<table class="summary claims"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></section>")
