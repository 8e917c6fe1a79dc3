"""``nba campaign report NAME --html FILE``: one self-contained HTML page (tables, PNG charts inline as
base64) that a marketer can open in a browser or attach to a mail."""

from __future__ import annotations

import base64
import html
import io

CHARTS = ("spend", "segments", "lift")  # the <img id="chart-..."> of the page, in order


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def charts(report: dict) -> dict[str, str]:
    """Base64 PNGs: spend against the even-spend line, acceptance rate per segment, lift with its CI."""
    return {name: _png(fig) for name, fig in figures(report).items()}


def figures(report: dict) -> dict:
    """The charts as matplotlib figures (rates and lift in percent, as the text gives them), by name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    out = {}
    spend = report["spend"]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    days = [s["day"] for s in spend]
    x = range(len(days))
    ax.bar(x, [s["presented"] for s in spend], color="C0", alpha=0.35, label="presented per day")
    ax.plot(x, [s["cumulative"] for s in spend], "-o", color="C0", markersize=3, label="spent (cumulative)")
    top = max([s["cumulative"] for s in spend], default=0)
    title = f"{report['campaign']}: spend and pacing"
    if report["total_budget"] is not None:
        ax.plot(x, [s["even_spend"] for s in spend], "--", color="0.4", label="even-spend line")
        top = max([top] + [s["even_spend"] for s in spend])
        if report["total_budget"] <= 1.5 * top:  # drawn when in reach, else named in the title
            ax.axhline(report["total_budget"], color="C3", linewidth=0.8, label="total budget")
            top = max(top, report["total_budget"])
        else:
            title += f" (total budget {report['total_budget']:,})"
    ax.set_ylim(0, max(top, 1) * 1.1)
    ax.set_xticks(list(x), days, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("presentations")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out["spend"] = fig

    segments = report["by_segment"]
    fig, ax = plt.subplots(figsize=(8, 3.2))
    names = list(segments)
    ax.bar(names, [segments[n]["acceptance_rate"] for n in names], color="C2", label="actual")
    plan = {r["segment"]: r["planned_acceptance_rate"] for r in report.get("versus_plan") or []}
    if plan:
        ax.plot(names, [plan.get(n) or 0 for n in names], "D", color="k", label="plan")
        ax.legend(fontsize=8)
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    ax.set_ylabel("acceptance rate")
    ax.set_title("acceptance rate per segment")
    fig.tight_layout()
    out["segments"] = fig

    lift = report["lift"]
    fig, ax = plt.subplots(figsize=(8, 1.8))
    if lift.get("lift") is not None:
        lo, hi = lift["ci95"]
        ax.errorbar([lift["lift"]], [0], xerr=[[lift["lift"] - lo], [hi - lift["lift"]]], fmt="o", color="C0", capsize=6)
        ax.axvline(0, color="0.5", linewidth=0.8)
        ax.xaxis.set_major_formatter(PercentFormatter(xmax=1.0))
        ax.set_xlabel("lift (95% interval)")
        verdict = "significant" if lift.get("significant") else "not significant yet (the interval includes 0)"
        ax.set_title(f"lift on {lift['objective']} per customer vs control: {lift['lift']:+.1%}, {verdict}")
    else:
        ax.text(0.5, 0.5, f"lift: {lift.get('note', 'n/a')}", ha="center", va="center", transform=ax.transAxes)
    ax.set_yticks([])
    fig.tight_layout()
    out["lift"] = fig
    return out


def _table(title: str, rows: dict[str, dict]) -> str:
    body = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{r['presented']}</td><td>{r['accepted']}</td>"
        f"<td>{r['acceptance_rate']:.1%}</td><td>{r['value']:,.2f}</td></tr>" for k, r in rows.items())
    return (f"<h2>By {html.escape(title)}</h2><table><tr><th>{html.escape(title)}</th><th>presented</th>"
            f"<th>accepted</th><th>rate</th><th>value</th></tr>{body}</table>")


def _rate(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.1%}"


def render_html(report: dict) -> str:
    t, lift = report["totals"], report["lift"]
    images = charts(report)
    lift_text = (f"{lift['lift']:+.1%} (95% CI {lift['ci95'][0]:+.1%} .. {lift['ci95'][1]:+.1%}); "
                 f"{html.escape(lift.get('in_words', ''))}"
                 if lift.get("lift") is not None else html.escape(str(lift.get("note", "n/a"))))
    plan_rows = "".join(
        f"<tr class='{html.escape(r['verdict'].replace(' ', '-'))}'><td>{html.escape(r['segment'])}</td>"
        f"<td>{r['presented_per_day']}</td><td>{r['planned_per_day']}</td><td>{_rate(r['acceptance_rate'])}</td>"
        f"<td>{_rate(r['planned_acceptance_rate'])}</td><td>{html.escape(r.get('in_words', r['verdict']))}</td></tr>"
        for r in report.get("versus_plan") or [])
    plan = (f"<h2>Against the plan</h2><table><tr><th>segment</th><th>presented/day</th><th>planned/day</th>"
            f"<th>rate</th><th>planned rate</th><th>against the plan</th></tr>{plan_rows}</table>") if plan_rows else ""
    pacing = report.get("pacing", {}).get("in_words")
    imgs = "".join(f'<img id="chart-{k}" alt="{k} chart" src="data:image/png;base64,{images[k]}">' for k in CHARTS)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Campaign {html.escape(report['campaign'])}</title>
<style>body{{font-family:sans-serif;max-width:900px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:.5em 0 1.5em}}td,th{{border:1px solid #ccc;padding:.25em .6em;text-align:right}}
td:first-child,th:first-child{{text-align:left}}img{{display:block;max-width:100%;margin:1em 0}}
tr.under td{{background:#fde2e2}}tr.over td{{background:#e2f5e2}}</style></head>
<body><h1>Campaign {html.escape(report['campaign'])}</h1>
<p>{html.escape(report['objective'])} &middot; owner {html.escape(report['owner'])} &middot; {html.escape(report['dates'])}</p>
<p><b>{t['presented']}</b> presented to {t['customers']} customers, <b>{t['accepted']}</b> accepted
({t['acceptance_rate']:.1%}), value <b>{t['value']:,.2f}</b>. Lift on {html.escape(lift['objective'])} per customer
against the control group: <b>{lift_text}</b> ({lift['customers']['treated']} treated, {lift['customers']['control']}
control customers).</p>
{f"<p>Budget: {html.escape(pacing)}.</p>" if pacing else ""}
{imgs}
{_table('channel', report['by_channel'])}{_table('segment', report['by_segment'])}{_table('action', report['by_action'])}
{plan}
<script>/* marks how many charts the browser decoded and drew (checked by tests with headless Chromium) */
window.addEventListener("load", () => {{
  const drawn = [...document.images].filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute("data-charts-rendered", String(drawn));
}});</script>
</body></html>
"""
