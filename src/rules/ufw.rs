//! The ufw variant (`set_ufw_loopback_traffic`, CIS 4.2.4): ComplianceAsCode's check over
//! `ufw status verbose`, and the four `ufw` commands of its remediation, each told apart so that
//! loopguard adds only what is missing and owns exactly what it added. Pure: the commands run in
//! `node::ufw`.

use serde::{Deserialize, Serialize};
use std::fmt;

/// One rule of ComplianceAsCode's remediation, as `ufw` takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum UfwRule {
    /// `ufw allow in on lo`
    AllowInLo,
    /// `ufw allow out on lo`
    AllowOutLo,
    /// `ufw deny in from 127.0.0.0/8`
    DenyInV4,
    /// `ufw deny in from ::1`
    DenyInV6,
}

/// A line pattern of ComplianceAsCode's check: literal pieces that `\s+` separates (`^` anchors
/// it at the line's start).
struct Pattern {
    anchored: bool,
    pieces: &'static [&'static str],
}

const fn at_start(pieces: &'static [&'static str]) -> Pattern {
    Pattern {
        anchored: true,
        pieces,
    }
}

impl UfwRule {
    pub const ALL: [UfwRule; 4] = [
        UfwRule::AllowInLo,
        UfwRule::AllowOutLo,
        UfwRule::DenyInV4,
        UfwRule::DenyInV6,
    ];

    /// The arguments of `ufw` that add it (`ufw delete` + these removes it).
    pub fn args(self) -> &'static [&'static str] {
        match self {
            UfwRule::AllowInLo => &["allow", "in", "on", "lo"],
            UfwRule::AllowOutLo => &["allow", "out", "on", "lo"],
            UfwRule::DenyInV4 => &["deny", "in", "from", "127.0.0.0/8"],
            UfwRule::DenyInV6 => &["deny", "in", "from", "::1"],
        }
    }

    /// What ComplianceAsCode's check greps for it (`ufw status verbose`); the IPv6 lines only
    /// count while IPv6 is on, as in the check.
    fn patterns(self, ipv6: bool) -> Vec<Pattern> {
        let (v4, v6) = match self {
            UfwRule::AllowInLo => (
                Some(at_start(&["Anywhere on lo", "ALLOW IN", "Anywhere"])),
                at_start(&["Anywhere (v6) on lo", "ALLOW IN", "Anywhere (v6)"]),
            ),
            UfwRule::AllowOutLo => (
                Some(at_start(&["Anywhere", "ALLOW OUT", "Anywhere on lo"])),
                at_start(&["Anywhere (v6)", "ALLOW OUT", "Anywhere (v6) on lo"]),
            ),
            UfwRule::DenyInV4 => (
                Some(at_start(&["Anywhere", "DENY IN", "127.0.0.0/8"])),
                // Not part of this rule: the v4 deny has no IPv6 twin.
                Pattern {
                    anchored: false,
                    pieces: &[],
                },
            ),
            UfwRule::DenyInV6 => (
                None,
                Pattern {
                    anchored: false,
                    pieces: &["Anywhere (v6)", "DENY IN", "::1"],
                },
            ),
        };
        let mut all: Vec<Pattern> = v4.into_iter().collect();
        if ipv6 && !v6.pieces.is_empty() {
            all.push(v6);
        }
        all
    }

    /// Whether the check needs this rule: the `::1` deny only while IPv6 is on.
    pub fn needed(self, ipv6: bool) -> bool {
        self != UfwRule::DenyInV6 || ipv6
    }

    /// Whether `ufw status verbose` shows it as ComplianceAsCode's check wants it.
    pub fn shown(self, status: &str, ipv6: bool) -> bool {
        self.patterns(ipv6)
            .iter()
            .all(|p| status.lines().any(|line| p.matches(line)))
    }

    /// Whether `ufw status verbose` lists it at all (its IPv4 line; the `::1` deny's IPv6 line).
    pub fn listed(self, status: &str) -> bool {
        self.shown(status, self == UfwRule::DenyInV6)
    }

    /// The name the state file keeps: `allow in on lo`.
    pub fn words(self) -> String {
        self.args().join(" ")
    }
}

impl fmt::Display for UfwRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ufw {}", self.words())
    }
}

impl Pattern {
    fn matches(&self, line: &str) -> bool {
        if self.anchored {
            return self.matches_from(line);
        }
        line.char_indices()
            .any(|(i, _)| self.matches_from(&line[i..]))
    }

    /// `piece \s+ piece \s+ piece` at the start of `text`.
    fn matches_from(&self, text: &str) -> bool {
        let mut rest = text;
        for (i, piece) in self.pieces.iter().enumerate() {
            if i > 0 {
                let trimmed = rest.trim_start_matches(char::is_whitespace);
                if trimmed.len() == rest.len() {
                    return false;
                }
                rest = trimmed;
            }
            match rest.strip_prefix(piece) {
                Some(after) => rest = after,
                None => return false,
            }
        }
        true
    }
}

/// Whether `ufw status verbose` says ufw is active.
pub fn active(status: &str) -> bool {
    status
        .lines()
        .next()
        .is_some_and(|l| l.trim() == "Status: active")
}

/// The rules the check needs that `ufw status verbose` does not show.
pub fn missing(status: &str, ipv6: bool) -> Vec<UfwRule> {
    UfwRule::ALL
        .into_iter()
        .filter(|r| r.needed(ipv6) && !r.shown(status, ipv6))
        .collect()
}

/// ComplianceAsCode's check (`sce/shared.sh`): every needed line is shown.
pub fn cac_passes(status: &str, ipv6: bool) -> bool {
    missing(status, ipv6).is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What ufw 0.36 prints after ComplianceAsCode's remediation, with IPv6 on.
    const REMEDIATED: &str = "Status: active
Logging: on (low)
Default: deny (incoming), allow (outgoing), disabled (routed)
New profiles: skip

To                         Action      From
--                         ------      ----
Anywhere on lo             ALLOW IN    Anywhere
Anywhere                   DENY IN     127.0.0.0/8
22/tcp                     ALLOW IN    Anywhere
Anywhere (v6) on lo        ALLOW IN    Anywhere (v6)
Anywhere (v6)              DENY IN     ::1
22/tcp (v6)                ALLOW IN    Anywhere (v6)

Anywhere                   ALLOW OUT   Anywhere on lo
Anywhere (v6)              ALLOW OUT   Anywhere (v6) on lo
";

    #[test]
    fn the_remediated_status_passes_and_each_missing_line_fails() {
        assert!(active(REMEDIATED));
        assert!(cac_passes(REMEDIATED, true));
        for (line, rule) in [
            ("Anywhere on lo             ALLOW IN", UfwRule::AllowInLo),
            ("Anywhere (v6) on lo        ALLOW IN", UfwRule::AllowInLo),
            ("Anywhere                   DENY IN", UfwRule::DenyInV4),
            ("Anywhere (v6)              DENY IN", UfwRule::DenyInV6),
            ("Anywhere                   ALLOW OUT", UfwRule::AllowOutLo),
            ("Anywhere (v6)              ALLOW OUT", UfwRule::AllowOutLo),
        ] {
            let without: String = REMEDIATED
                .lines()
                .filter(|l| !l.starts_with(line))
                .map(|l| format!("{l}\n"))
                .collect();
            assert_eq!(missing(&without, true), [rule], "without {line:?}");
        }
    }

    #[test]
    fn with_ipv6_off_the_v6_lines_are_not_needed() {
        let v4_only: String = REMEDIATED
            .lines()
            .filter(|l| !l.contains("(v6)"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(cac_passes(&v4_only, false));
        assert_eq!(
            missing(&v4_only, true),
            [UfwRule::AllowInLo, UfwRule::AllowOutLo, UfwRule::DenyInV6]
        );
    }

    #[test]
    fn an_inactive_ufw_shows_nothing() {
        assert!(!active("Status: inactive\n"));
        assert_eq!(missing("Status: inactive\n", true), UfwRule::ALL);
    }

    #[test]
    fn look_alikes_do_not_pass() {
        // An interface whose name starts with lo, a narrower range, an allow where a deny is
        // wanted: ComplianceAsCode's regexes refuse each (whitespace must follow `lo`).
        let status = "Status: active\n\nAnywhere on lo2            ALLOW IN    Anywhere\n\
                      Anywhere                   ALLOW IN    127.0.0.0/8\n\
                      Anywhere                   DENY IN     127.0.0.0/16\n\
                      Anywhere (v6) on lo        DENY IN     Anywhere (v6)\n";
        assert_eq!(missing(status, true), UfwRule::ALL);
    }
}
