//! `loopguard report -o html`: one self-contained page, rendered by askama from the template below.
//! Every value from the cluster goes through the template's HTML escaping (askama escapes `{{ }}`
//! in an `html` template unless told otherwise, and nothing here tells it otherwise).

use super::{Evidence, NodeEvidence};
use askama::Template;

#[derive(Template)]
#[template(
    ext = "html",
    source = r##"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>loopguard evidence: {{ e.rule.title }}</title>
<style>
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 72rem; color: #1d2433; padding: 0 1.5rem; }
h1 { font-size: 1.6rem; margin: 0 0 .2rem; } h2 { font-size: 1.15rem; margin: 2rem 0 .6rem; }
.meta { color: #5b6478; font-size: .9rem; } code { font: .85rem ui-monospace, monospace; background: #f1f3f7; padding: .05rem .3rem; border-radius: 3px; }
.banner { margin: 1.2rem 0; padding: .9rem 1.1rem; border-radius: 8px; font-weight: 600; }
.banner.pass { background: #e4f6ea; color: #14632f; } .banner.fail { background: #fde8e8; color: #8a1c1c; } .banner.none { background: #fff4dc; color: #7a5200; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(9rem, 1fr)); gap: .8rem; }
.card { border: 1px solid #e1e5ee; border-radius: 8px; padding: .8rem 1rem; }
.card .n { font-size: 1.8rem; font-weight: 700; display: block; } .card .l { color: #5b6478; font-size: .85rem; }
table { border-collapse: collapse; width: 100%; font-size: .88rem; }
th, td { text-align: left; padding: .45rem .55rem; border-bottom: 1px solid #e8ebf2; vertical-align: top; }
th { background: #f6f7fa; font-weight: 600; }
.v { font-weight: 600; padding: .1rem .45rem; border-radius: 4px; white-space: nowrap; }
.v-Compliant { background: #e4f6ea; color: #14632f; } .v-NonCompliant, .v-Error, .v-Unknown, .v-Missing { background: #fde8e8; color: #8a1c1c; }
.v-NotApplicable, .v-Unmanaged, .v-Exempted { background: #eef0f5; color: #454d60; }
ul.rules { margin: 0; padding-left: 1rem; } .small { color: #5b6478; font-size: .8rem; }
</style></head><body>
<h1>IPv6 loopback baseline: compliance evidence</h1>
<div class="meta">Rule <code>{{ e.rule.id }}</code>, {{ e.rule.title }}<br>{{ e.rule.references|join("; ") }}<br>Generated {{ e.generated_at }} from <code>{{ e.cluster }}</code>{% if let Some(uid) = e.cluster_uid %} (cluster {{ uid }}){% endif %} by loopguard {{ e.loopguard_version }}</div>
<div class="banner {{ overall_class }}" id="overall">{{ overall_text }}</div>
<div class="cards">
{%- for (id, label, n) in cards %}
<div class="card"><span class="n" id="count-{{ id }}">{{ n }}</span><span class="l">{{ label }}</span></div>
{%- endfor %}
</div>
<h2>Baseline</h2>
<ul class="rules">{% for rule in e.rule.baseline %}<li><code>{{ rule }}</code></li>{% endfor %}</ul>
<h2>Policies</h2>
<table><tr><th>Policy</th><th>Mode</th><th>Compliant</th><th>Nodes</th><th>Why</th><th>Last approved change</th></tr>
{%- for p in e.policies %}
<tr><td>{{ p.name }}</td><td>{{ p.mode }}</td><td>{{ p.compliant }}</td><td>{{ p.compliant_nodes }}/{{ p.targeted_nodes - p.not_applicable_nodes }} ({{ p.not_applicable_nodes }} not applicable)</td><td>{{ p.reason }} <span class="small">{{ p.message }}</span></td><td>
{%- if let Some(a) = p.last_approval -%}
{{ a.by }} <span class="small">{{ a.reason }}{% if let Some(g) = a.generation %} (generation {{ g }}){% endif %}</span>
{%- else -%}
-
{%- endif -%}
</td></tr>
{%- endfor %}
</table>
{%- if !e.exceptions.is_empty() %}
<h2>Exceptions</h2>
<table id="exceptions"><tr><th>Exception</th><th>State</th><th>Rules</th><th>Nodes exempted</th><th>Approved</th><th>Ticket</th><th>Expires</th><th>Justification</th></tr>
{%- for x in e.exceptions %}
<tr><td>{{ x.name }}</td><td>{{ x.state }}</td><td>{{ x.rule_ids|join(", ") }}</td><td>{{ x.exempted_nodes|join(", ") }}</td><td>{{ x.approved_by }} <span class="small">{{ x.approved_at }}</span></td><td>{{ x.ticket }}</td><td>{{ x.expires }}</td><td>{{ x.justification }}</td></tr>
{%- endfor %}
</table>
{%- endif %}
<h2>Loopback rules</h2>
<table id="rules"><tr><th>Rule (ComplianceAsCode)</th><th>Pass</th><th>Fail</th><th>Not applicable</th><th>Ignored</th><th>Unknown</th></tr>
{%- for r in e.rules %}
<tr id="rule-{{ r.id }}"><td><code>{{ r.id }}</code></td><td>{{ r.pass }}</td><td>{{ r.fail }}</td><td>{{ r.not_applicable }}</td><td>{{ r.ignored }}</td><td>{{ r.unknown }}</td></tr>
{%- endfor %}
</table>
<h2>Nodes</h2>
<table id="nodes"><tr><th>Node</th><th>Verdict</th><th>Rules</th><th>Backend</th><th>Last verified</th><th>Repairs</th><th>Agent</th></tr>
{%- for n in e.nodes %}
<tr><td>{{ n.node }}<div class="small">{{ n.policy.as_deref().unwrap_or("no policy") }}</div></td><td><span class="v v-{{ n.verdict }}">{{ n.verdict }}</span><div class="small">{{ n.reason }}: {{ n.message }}
{%- if let Some(t) = n.verdict_since %}<br>verdict since {{ t }}{% endif -%}
{%- if let Some(t) = n.non_compliant_since %}<br><b>not compliant since {{ t }}</b>{% endif -%}
</div></td><td><ul class="rules">
{%- for r in n.rules %}<li><code>{{ r.rule }}</code> {{ r.state }}{% if r.owned %}, inserted by loopguard{% endif %}</li>{% endfor -%}
{%- for c in self::applicable(n) %}<li><code>{{ c.id }}</code> {{ c.verdict }}<span class="small"> {{ c.reason }}</span></li>{% endfor -%}
</ul></td><td>{{ n.backend.as_deref().unwrap_or("-") }}</td><td>{{ n.last_verified_time.as_deref().unwrap_or("never") }}</td><td>{{ n.repairs }}<div class="small">{{ n.last_repair_time.as_deref().unwrap_or("") }}</div></td><td>{{ n.agent_version.as_deref().unwrap_or("-") }}</td></tr>
{%- endfor %}
</table>
</body></html>
"##
)]
struct Page<'a> {
    e: &'a Evidence,
    overall_class: &'static str,
    overall_text: &'static str,
    cards: [(&'static str, &'static str, usize); 9],
}

/// The checks shown for a node: those that apply or whose applicability is unknown.
fn applicable(n: &NodeEvidence) -> impl Iterator<Item = &super::CheckRow> {
    n.checks.iter().filter(|c| c.applies != Some(false))
}

pub fn render(e: &Evidence) -> String {
    let s = &e.summary;
    let failing = s.failing();
    let (overall_class, overall_text) = if failing == 0 && s.compliant > 0 {
        ("pass", "Every managed node carries the baseline")
    } else if failing == 0 {
        ("none", "No node is verified compliant")
    } else {
        ("fail", "Some nodes do not carry the baseline")
    };
    Page {
        e,
        overall_class,
        overall_text,
        cards: [
            ("nodes", "nodes", s.nodes),
            ("compliant", "compliant", s.compliant),
            ("non-compliant", "not compliant", s.non_compliant),
            ("exempted", "exempted (LoopbackException)", s.exempted),
            ("not-applicable", "not applicable", s.not_applicable),
            ("errored", "errors", s.errored),
            ("unknown", "unknown (no live agent)", s.unknown),
            ("unmanaged", "unmanaged", s.unmanaged),
            ("missing", "missing (no agent report)", s.missing),
        ],
    }
    .render()
    .expect("the report page renders: every value it shows is a plain string or number")
}
