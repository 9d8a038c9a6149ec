#!/usr/bin/env bash
# Mutation check: realistic defects, one per promise the README makes, each applied to a copy of the
# tree; the tests named beside it must fail. A mutant they do not catch ("SURVIVED") or one that no
# longer applies or compiles ("BROKEN") fails the run.
#
#   hack/mutants.sh            # every mutant (some need the control plane: LOOPGUARD_REQUIRE_CLUSTER is set)
#   hack/mutants.sh --ci       # the fixed subset CI runs (unit, property and kernel tests; about 10 minutes)
#   hack/mutants.sh --list     # the list, as the README shows it
#   hack/mutants.sh ID...      # those mutants
#
# Needs root for the kernel tests (network namespaces). The copy of the tree lives in
# ~/.cache/loopguard/mutants/tree and is reused; builds share CARGO_TARGET_DIR (default
# ~/.cache/loopguard/target), so only loopguard's own crate is rebuilt per mutant.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${LOOPGUARD_CACHE:-$HOME/.cache/loopguard}
tree=$cache/mutants/tree
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$cache/target}
export PATH=$HOME/.cargo/bin:/usr/local/go/bin:$PATH
export LOOPGUARD_REQUIRE_CLUSTER=1

ids=() promises=() files=() froms=() tos=() tests=() where=()
# mutant ID PROMISE FILE FROM TO TEST-ARGS ci|hand
mutant() {
    ids+=("$1") promises+=("$2") files+=("$3") froms+=("$4") tos+=("$5") tests+=("$6") where+=("$7")
}

mutant ownership "a copy that disappears is taken from loopguard's count first" \
    src/rules/ip6tables/ownership.rs \
    'entry.owned = entry.owned.saturating_sub(entry.observed - now);' \
    'entry.owned = entry.owned.min(now);' \
    '--test rules_properties' ci
mutant cleanup "cleanup removes only the copies loopguard owns" \
    src/rules/ip6tables/plan.rs \
    'let copies = ownership.owned(rule).min(tables.count(rule));' \
    'let copies = tables.count(rule);' \
    '--test rules_properties' ci
mutant lookalike-entry "the entry loopguard inserts is the one ip6tables-legacy writes, not a look-alike (-p all)" \
    src/rules/ip6tables/blob.rs \
    'interface(addresses.iniface, addresses.iniface_mask);' \
    'interface(addresses.iniface, addresses.iniface_mask); if rule.family == Family::Ipv6 { e[131] = 1; }' \
    '--test legacy_kernel' ci
mutant nft-recheck "a re-check answers from the last read only while the ruleset's generation stands still" \
    src/node/nft_rules.rs \
    'if held.generation == now {' \
    'if held.generation <= now {' \
    '--test nft_inprocess a_check_in_an_unmoved_generation' ci
mutant nft-journal "a changed read is taken from the notifications only when all they tell is rules deleted from INPUT or OUTPUT" \
    src/rules/nft/journal.rs \
    '_ => self.pending.touched.push(family),' \
    '_ => {}' \
    '--test nft_inprocess a_followed_read' ci
mutant back-off "a fight backs off, doubling from 1 s to 30 s" \
    src/node/converge.rs \
    '.saturating_mul(1u32 << (self.level - 1).min(16))' \
    '.saturating_mul(1)' \
    '--lib node::converge' ci
mutant agent-grace "a node whose agent is gone for longer than the grace period is not counted" \
    src/aggregate/vouch.rs \
    'Some(t) if age(now, t) <= settings.agent_grace => Vouch::Live,' \
    'Some(_) => Vouch::Live,' \
    '--lib aggregate' ci
mutant pod-ready "only a Ready agent Pod vouches for its node" \
    src/aggregate/vouch.rs \
    'AgentPod::Ready => return Vouch::Live,' \
    'AgentPod::Ready | AgentPod::NotReady { .. } => return Vouch::Live,' \
    '--lib aggregate' ci
mutant heartbeat "an unchanged status is written again once a heartbeat interval has passed" \
    src/agent/report.rs \
    '(Some(was), Some(is)) => is.0.duration_since(was.0).unsigned_abs() >= heartbeat,' \
    '(Some(_), Some(_)) => false,' \
    '--lib agent::report' ci
mutant healthz "/healthz fails once the loop stops going round" \
    src/metrics.rs \
    '(silent > limit).then(|| {' \
    '(silent > limit && limit.is_zero()).then(|| {' \
    '--lib metrics' ci
mutant nft-dormant "a dormant table named loopguard is not loopguard's" \
    src/rules/nft/mod.rs \
    'if table.flags != 0 {' \
    'if table.flags > 1 {' \
    '--lib rules::nft' ci
mutant event-path "nftables drift is repaired on the kernel's event, not at the resync" \
    src/node/watch.rs \
    'let group: libc::c_int = libc::NFNLGRP_NFTABLES;' \
    'let group: libc::c_int = libc::NFNLGRP_NFTRACE;' \
    '--test node_engine nft::watch_repairs_a_deleted_rule' hand
mutant legacy-probe "on the legacy backend the shape probe sees a change the lock does not show" \
    src/node/watch.rs \
    'if used | (due && probe.changed()) {' \
    'if used {' \
    '--test node_engine legacy_watch_repairs_a_change_right_after_its_own_write' hand
mutant nft-bytes "loopguard's nftables table is the one nft -f writes for its rules" \
    src/rules/nft/wire.rs \
    'saddr(12, vec![127]).to_vec(),' \
    'saddr(12, vec![126]).to_vec(),' \
    '--test nft_differential netlink_and_nft_write_the_same_table' hand
mutant nft-generation "a write to loopguard's nftables table never takes a change made after loopguard read it" \
    src/rules/nft/wire.rs \
    'bytes.u32(NFNL_BATCH_GENID, generation);' \
    'let _ = generation;' \
    '--test nft_differential a_change_between_reading_and_writing_the_table_fails_the_write' ci
mutant nft-foreign-rule "a drift repair never flushes a rule someone else put in loopguard's nftables chain" \
    src/rules/nft/mod.rs \
    'None => return other("it holds a rule that is not one of loopguard'"'"'s"),' \
    'None => {}' \
    '--test nft_differential a_foreign_rule_in_loopguards_table_stops_its_repair' ci
mutant report-exit "loopguard report exits 1 when a node fails" \
    src/report.rs \
    'Ok(ExitCode::from(if failing == 0 { 0 } else { 1 }))' \
    'Ok(ExitCode::from(if failing == usize::MAX { 1 } else { 0 }))' \
    '--test controller loopguard_report_exits_1' hand
mutant alert-metric "the metrics the alerts and the dashboard query exist under their names" \
    src/agent/mod.rs \
    '"rule_verdict",' \
    '"rule_verdicts",' \
    '--test agent_e2e' hand
mutant admission "an agent may write only its own node's LoopbackNodeState" \
    charts/loopguard/templates/admission-policy.yaml \
    "expression: variables.callerNode == '' || variables.callerNode == variables.target" \
    "expression: variables.callerNode == '' || variables.callerNode != ''" \
    '--test chart the_admission_policy_confines_each_agent_to_its_own_node' hand
mutant uninstall-hooks "the uninstall hooks delete only while Helm uninstalls the release" \
    src/uninstall.rs \
    'Some(status) if status == "uninstalling" => {}' \
    '_ if true => {}' \
    '--test chart the_chart_runs_on_hollow_nodes' hand
mutant monitors "the ServiceMonitor/PodMonitor scrape a named port of both components" \
    charts/loopguard/templates/servicemonitor.yaml \
    '    - port: metrics' \
    '    - port: http-metrics' \
    '--test chart the_monitors_scrape_a_named_port_of_both_components' ci

list() {
    echo "| mutant | promise | the defect | killed by | in CI |"
    echo "|---|---|---|---|---|"
    for i in "${!ids[@]}"; do
        printf '| `%s` | %s | `%s`: `%s` → `%s` | `cargo test %s` | %s |\n' "${ids[$i]}" "${promises[$i]}" \
            "${files[$i]}" "${froms[$i]}" "${tos[$i]}" "${tests[$i]}" "$([ "${where[$i]}" = ci ] && echo yes || echo by hand)"
    done
}

selected=()
case "${1:-}" in
    --list) list; exit 0 ;;
    --ci) for i in "${!ids[@]}"; do [ "${where[$i]}" = ci ] && selected+=("$i"); done ;;
    "") selected=("${!ids[@]}") ;;
    *) for want in "$@"; do
           found=
           for i in "${!ids[@]}"; do [ "${ids[$i]}" = "$want" ] && selected+=("$i") && found=1; done
           [ -n "$found" ] || { echo "mutants: no mutant $want (hack/mutants.sh --list)" >&2; exit 2; }
       done ;;
esac

# A fresh copy of the checkout (modification times kept, so cargo rebuilds only what differs).
rm -rf "$tree"
mkdir -p "$tree"
tar -C "$repo" --exclude=./.git --exclude=./target -cf - . | tar -C "$tree" -xf -

# Replaces FROM by TO in FILE; FROM must occur exactly once (else the mutant no longer applies).
apply() {
    python3 - "$1" "$2" "$3" <<'EOF'
import sys
path, old, new = sys.argv[1:]
text = open(path).read()
if text.count(old) != 1:
    sys.exit(f"{path}: the mutated line occurs {text.count(old)} times, not once: {old}")
open(path, "w").write(text.replace(old, new))
EOF
}

failed=0
started=$(date +%s)
for i in "${selected[@]}"; do
    id=${ids[$i]} file=${files[$i]}
    t0=$(date +%s)
    cp "$repo/$file" "$tree/$file"
    if ! apply "$tree/$file" "${froms[$i]}" "${tos[$i]}"; then
        echo "BROKEN   $id: does not apply"; failed=1; continue
    fi
    # shellcheck disable=SC2086
    if ! (cd "$tree" && cargo test --quiet --no-run ${tests[$i]} >"$cache/mutants/$id.build.log" 2>&1); then
        echo "BROKEN   $id: does not compile ($cache/mutants/$id.build.log)"; failed=1
        cp "$repo/$file" "$tree/$file"; continue
    fi
    # shellcheck disable=SC2086
    if (cd "$tree" && timeout 900 cargo test --quiet ${tests[$i]} >"$cache/mutants/$id.log" 2>&1); then
        echo "SURVIVED $id ($(( $(date +%s) - t0 )) s): ${promises[$i]}; cargo test ${tests[$i]} passed"
        failed=1
    else
        echo "killed   $id ($(( $(date +%s) - t0 )) s) by cargo test ${tests[$i]}"
    fi
    cp "$repo/$file" "$tree/$file"
done
# The tree builds into the shared target directory under the same artefact names as the checkout,
# and cargo judges freshness by the checkout's own files, which are older than the mutants' builds:
# without this, the next `cargo test` in the checkout would run the last mutant's binaries.
for i in "${selected[@]}"; do touch "$repo/${files[$i]}"; done
echo "mutants: ${#selected[@]} run in $(( $(date +%s) - started )) s"
exit $failed
