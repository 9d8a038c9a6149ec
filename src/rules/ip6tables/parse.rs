//! Reading `iptables -S CHAIN` output, where every rule counts, whatever it looks like, and
//! the shape of one rule as `iptables -L -v -n` would show it to a scanner.
//!
//! Positions are only ever used to place loopguard's own inserts, but a listing that dropped a
//! line would still misplace them, so nothing is dropped: an empty rule (`-A INPUT`) is an empty
//! spec, a comment holding a newline stays one rule, and a line that is not understood is kept
//! as an opaque foreign rule that can never equal one of loopguard's.

use super::{Chain, Family};

/// The rules of one built-in chain, in order, as specs without the `-A CHAIN ` prefix.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChainListing {
    pub rules: Vec<String>,
}

/// The prefix of a line that `-S` printed but loopguard could not read as a rule of its chain.
/// No loopguard spec starts with `#`, so an opaque rule never matches one of loopguard's.
pub const OPAQUE: &str = "# unparsed: ";

/// The prefix of a line that `-S` prints exactly like one of loopguard's rules but that is another
/// entry in the kernel (on the legacy backend `-i lo -p all -j ACCEPT` lists as `-i lo -j ACCEPT`,
/// yet its entry differs, and `ip6tables -D INPUT -i lo -j ACCEPT` does not remove it). The
/// scanners read it as the rule it prints as; ownership and deletes never take it for
/// loopguard's. Only the legacy reader, which sees the entries' bytes, marks lines this way.
pub const LOOK_ALIKE: &str = "# look-alike: ";

impl ChainListing {
    /// Parses the output of `iptables -S CHAIN`: the `-P` (policy) line is skipped, every other
    /// line is a rule of the chain, in order.
    pub fn parse(chain: Chain, output: &str) -> ChainListing {
        let prefix = format!("-A {}", chain.name());
        let rules = logical_lines(output)
            .into_iter()
            .filter(|line| !line.trim().is_empty() && !line.starts_with("-P "))
            .map(|line| match line.strip_prefix(&prefix) {
                Some("") => String::new(),
                Some(rest) if rest.starts_with(' ') => rest[1..].to_string(),
                _ => format!("{OPAQUE}{line}"),
            })
            .collect();
        ChainListing { rules }
    }

    /// 0-based positions of the rules whose spec is exactly `spec`.
    pub fn positions(&self, spec: &str) -> Vec<usize> {
        self.rules
            .iter()
            .enumerate()
            .filter(|(_, rule)| *rule == spec)
            .map(|(i, _)| i)
            .collect()
    }

    /// The 0-based position of the first catch-all rule (see [`Shape::catch_all`]), if any.
    pub fn first_catch_all(&self) -> Option<usize> {
        self.rules
            .iter()
            .position(|r| !Shape::surely_not_catch_all(r) && Shape::of(r).catch_all())
    }

    /// The listing as `-S` prints it, for tests and messages.
    pub fn render(&self, chain: Chain) -> String {
        let mut out = format!("-P {} ACCEPT\n", chain.name());
        for rule in &self.rules {
            let rule = rule.strip_prefix(LOOK_ALIKE).unwrap_or(rule);
            if rule.is_empty() {
                out.push_str(&format!("-A {}\n", chain.name()));
            } else {
                out.push_str(&format!("-A {} {rule}\n", chain.name()));
            }
        }
        out
    }
}

/// Splits `-S` output into rules: a newline inside a double-quoted argument (iptables prints a
/// comment that holds one that way) does not end the rule. If a quote is never closed, the
/// output is not what iptables prints; then every physical line counts on its own.
fn logical_lines(output: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut current = String::new();
    let (mut quoted, mut escaped) = (false, false);
    for c in output.chars() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '\n' if !quoted => {
                lines.push(std::mem::take(&mut current).trim_end().to_string());
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    if quoted {
        return output.lines().map(|l| l.trim_end().to_string()).collect();
    }
    if !current.is_empty() {
        lines.push(current.trim_end().to_string());
    }
    lines
}

/// Splits a rule spec into its arguments as iptables quotes them: `"..."` with backslash escapes.
pub fn split_args(spec: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut current: Option<String> = None;
    let (mut quoted, mut escaped) = (false, false);
    for c in spec.chars() {
        if escaped {
            current.get_or_insert_with(String::new).push(c);
            escaped = false;
        } else if quoted && c == '\\' {
            escaped = true;
        } else if c == '"' {
            quoted = !quoted;
            current.get_or_insert_with(String::new);
        } else if c.is_whitespace() && !quoted {
            args.extend(current.take());
        } else {
            current.get_or_insert_with(String::new).push(c);
        }
    }
    args.extend(current);
    args
}

/// An address, interface or protocol argument, with its `!`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Arg {
    pub negated: bool,
    pub value: String,
}

/// What `iptables -L -v -n` shows of a rule, which is what the scanners look at: the target, the
/// protocol, the interfaces and addresses, and whether anything else is printed after them (a
/// match such as `tcp dpt:22`, a comment, a target's options).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Shape {
    pub target: Option<String>,
    pub protocol: Option<Arg>,
    pub in_interface: Option<Arg>,
    pub out_interface: Option<Arg>,
    pub source: Option<Arg>,
    pub destination: Option<Arg>,
    /// Matches (`-m ...`) and anything not read above: printed after the addresses.
    pub matches: Vec<String>,
    /// Arguments after the target (`--reject-with ...`), printed after the addresses too.
    pub target_options: Vec<String>,
    /// Something the scanners' column layout cannot show as `--` (IPv4 `-f`) or an argument
    /// that was not understood at all.
    pub unusual: bool,
}

impl Shape {
    /// Reads a spec (`-i lo -j ACCEPT`). Never fails: what is not understood makes it `unusual`.
    pub fn of(spec: &str) -> Shape {
        let mut shape = Shape::default();
        // A look-alike shows exactly as the text it prints.
        let spec = spec.strip_prefix(LOOK_ALIKE).unwrap_or(spec);
        if spec.starts_with(OPAQUE) {
            shape.unusual = true;
            return shape;
        }
        let args = split_args(spec);
        let mut i = 0;
        let mut negated = false;
        while i < args.len() {
            let arg = args[i].as_str();
            let value = args.get(i + 1).cloned();
            let take = |negated: bool| value.clone().map(|value| Arg { negated, value });
            match arg {
                "!" => {
                    negated = true;
                    i += 1;
                    continue;
                }
                "-p" | "--protocol" => shape.protocol = take(negated),
                "-i" | "--in-interface" => shape.in_interface = take(negated),
                "-o" | "--out-interface" => shape.out_interface = take(negated),
                "-s" | "--source" => shape.source = take(negated),
                "-d" | "--destination" => shape.destination = take(negated),
                "-j" | "--jump" | "-g" | "--goto" => {
                    shape.target = value;
                    shape.target_options = args[(i + 2).min(args.len())..].to_vec();
                    if arg.starts_with("-g") || arg == "--goto" {
                        shape.unusual = true;
                    }
                    break;
                }
                "-m" | "--match" => {
                    // The match and its options, up to the next match or target.
                    let end = args[i + 1..]
                        .iter()
                        .position(|a| {
                            ["-m", "--match", "-j", "--jump", "-g", "--goto"].contains(&a.as_str())
                        })
                        .map_or(args.len(), |p| i + 1 + p);
                    shape.matches.extend(args[i..end].iter().cloned());
                    i = end;
                    negated = false;
                    continue;
                }
                _ => {
                    shape.unusual = true;
                    shape.matches.push(arg.to_string());
                    i += 1;
                    negated = false;
                    continue;
                }
            }
            if value.is_none() {
                shape.unusual = true;
            }
            negated = false;
            i += 2;
        }
        shape
    }

    /// Whether `spec`, without being parsed, is surely not a catch-all: it starts with an address,
    /// interface or protocol argument, or it has no quote or escape (so its words are its
    /// arguments) and such an argument or a match other than a comment. A long chain of such
    /// rules is read without a parse each.
    pub fn surely_not_catch_all(spec: &str) -> bool {
        // The first word is an argument whatever quotes follow: most rules start with one.
        let first = spec.split(' ').next().unwrap_or_default();
        if matches!(first, "-p" | "-i" | "-o" | "-s" | "-d") && spec.len() > first.len() {
            return true;
        }
        if spec.bytes().any(|b| matches!(b, b'"' | b'\\' | b'\'')) || spec.starts_with('#') {
            return false;
        }
        let mut words = spec.split_whitespace().peekable();
        while let Some(w) = words.next() {
            match w {
                "-p" | "--protocol" | "-i" | "--in-interface" | "-o" | "--out-interface" | "-s"
                | "--source" | "-d" | "--destination" => return true,
                "-m" | "--match" if words.peek() != Some(&"comment") => return true,
                _ => {}
            }
        }
        false
    }

    /// Whether `spec`, without being parsed, surely neither names the loopback interface nor
    /// `family`'s loopback source: then no scanner counts it as one of the baseline rules.
    pub fn surely_not_loopback(spec: &str, family: Family) -> bool {
        !spec.contains("lo") && !spec.contains(family.loopback_source())
    }

    fn is(arg: &Option<Arg>, value: &str) -> bool {
        arg.as_ref().is_some_and(|a| !a.negated && a.value == value)
    }

    /// A protocol the scanners accept: none, or one they show as a plain number (not negated).
    fn plain_protocol(&self) -> bool {
        self.protocol.as_ref().is_none_or(|p| !p.negated)
    }

    fn plain(&self) -> bool {
        !self.unusual && self.plain_protocol()
    }

    /// Shows as `ACCEPT <proto> -- lo * ::/0 ::/0` with nothing after: the scanner's INPUT accept.
    pub fn accepts_loopback_in(&self) -> bool {
        self.plain()
            && self.target.as_deref() == Some("ACCEPT")
            && self.target_options.is_empty()
            && Shape::is(&self.in_interface, "lo")
            && self.out_interface.is_none()
            && self.source.is_none()
            && self.destination.is_none()
            && self.matches.is_empty()
    }

    /// Shows as `DROP <proto> -- * * <loopback> <any>`, whatever follows: the scanner's DROP.
    pub fn drops_loopback_source(&self, family: Family) -> bool {
        self.plain()
            && self.target.as_deref() == Some("DROP")
            && self.in_interface.is_none()
            && self.out_interface.is_none()
            && Shape::is(&self.source, family.loopback_source())
            && self.destination.is_none()
    }

    /// Shows as `ACCEPT <proto> -- * lo <any> <any>`, whatever follows: the scanner's OUTPUT accept.
    pub fn accepts_loopback_out(&self) -> bool {
        self.plain()
            && self.target.as_deref() == Some("ACCEPT")
            && self.in_interface.is_none()
            && Shape::is(&self.out_interface, "lo")
            && self.source.is_none()
            && self.destination.is_none()
    }

    /// A rule that ends the chain for every packet: no match but perhaps a comment, and a target
    /// that decides (`-j DROP`, `-j REJECT --reject-with ...`, `-j ACCEPT`, `-j RETURN`). Rules
    /// after it never see a packet.
    pub fn catch_all(&self) -> bool {
        let only_comments = self
            .matches
            .chunks(4)
            .all(|c| c.len() == 4 && c[0] == "-m" && c[1] == "comment" && c[2] == "--comment");
        !self.unusual
            && self.protocol.is_none()
            && self.in_interface.is_none()
            && self.out_interface.is_none()
            && self.source.is_none()
            && self.destination.is_none()
            && only_comments
            && matches!(
                self.target.as_deref(),
                Some("DROP" | "REJECT" | "ACCEPT" | "RETURN")
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shortcuts never skip a rule whose shape matters.
    #[test]
    fn shortcuts_agree_with_the_parse() {
        use crate::rules::{Rule, scanner_counts_as};
        let specs = [
            "-i lo -j ACCEPT",
            "-s ::1/128 -j DROP",
            "-o lo -j ACCEPT",
            "-j DROP",
            "-j REJECT --reject-with icmp6-port-unreachable",
            "-m comment --comment x -j DROP",
            "-m comment --comment \"-s a\" -j DROP",
            "-p tcp -m tcp --dport 22 -j ACCEPT",
            "-s 2001:db8::1/128 -p tcp -m tcp --dport 1000 -j ACCEPT",
            "-d 2001:db8::1/128 -j REJECT --reject-with icmp6-port-unreachable",
            "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            "-i eth0 -j DROP",
            "--in-interface lo -j ACCEPT",
            "-s 127.0.0.0/8 -j DROP",
            "# look-alike: -i lo -j ACCEPT",
            "-j LOG --log-prefix \"lo: \"",
            "-s 2001:db8::1/128 -m comment --comment \"a b\" -j DROP",
            "-p",
            "",
        ];
        for spec in specs {
            let shape = Shape::of(spec);
            if Shape::surely_not_catch_all(spec) {
                assert!(!shape.catch_all(), "{spec}");
            }
            for family in [Family::Ipv6, Family::Ipv4] {
                if Shape::surely_not_loopback(spec, family) {
                    for rule in Rule::baseline(family) {
                        assert!(!scanner_counts_as(rule, spec), "{spec} {rule}");
                    }
                }
            }
        }
        assert!(Shape::surely_not_catch_all("-p tcp -j DROP"));
        assert!(Shape::surely_not_catch_all(
            "-s 2001:db8::1/128 -m comment --comment \"a b\" -j DROP"
        ));
        assert!(!Shape::surely_not_catch_all(
            "-m comment --comment \"-p\" -j DROP"
        ));
        assert!(Shape::surely_not_loopback(
            "-d 2001:db8::2/128 -j REJECT",
            Family::Ipv6
        ));
    }

    #[test]
    fn every_rule_line_counts_even_empty_and_multi_line_ones() {
        let out = "-P INPUT ACCEPT\n-A INPUT\n-A INPUT -m comment --comment \"x\ny\" -j ACCEPT\n\
                   -A INPUT -p tcp -m tcp --dport 22 -j ACCEPT\n";
        let listing = ChainListing::parse(Chain::Input, out);
        assert_eq!(
            listing.rules,
            vec![
                "",
                "-m comment --comment \"x\ny\" -j ACCEPT",
                "-p tcp -m tcp --dport 22 -j ACCEPT"
            ]
        );
        assert_eq!(
            ChainListing::parse(Chain::Input, &listing.render(Chain::Input)),
            listing
        );
    }

    #[test]
    fn lines_not_understood_are_kept_as_opaque_rules() {
        let out = "-P INPUT DROP\n-A INPUTX -j ACCEPT\nsomething else\n-A INPUT -i lo -j ACCEPT\n";
        let listing = ChainListing::parse(Chain::Input, out);
        assert_eq!(listing.rules.len(), 3);
        assert!(listing.rules[0].starts_with(OPAQUE));
        assert!(listing.rules[1].starts_with(OPAQUE));
        assert_eq!(listing.positions("-i lo -j ACCEPT"), vec![2]);
    }

    #[test]
    fn an_unclosed_quote_falls_back_to_physical_lines() {
        let out = "-A INPUT -m comment --comment \"open -j ACCEPT\n-A INPUT -i lo -j ACCEPT\n";
        let listing = ChainListing::parse(Chain::Input, out);
        assert_eq!(listing.rules.len(), 2);
        assert_eq!(listing.positions("-i lo -j ACCEPT"), vec![1]);
    }

    #[test]
    fn arguments_are_split_as_iptables_quotes_them() {
        assert_eq!(
            split_args(r#"-m comment --comment "a \"b\" c\\d" -j ACCEPT"#),
            vec!["-m", "comment", "--comment", "a \"b\" c\\d", "-j", "ACCEPT"]
        );
        assert_eq!(split_args(r#"--comment """#), vec!["--comment", ""]);
        assert!(split_args("").is_empty());
    }

    #[test]
    fn shapes_follow_what_the_scanner_sees() {
        let v6 = Family::Ipv6;
        assert!(Shape::of("-i lo -j ACCEPT").accepts_loopback_in());
        // iptables -L shows "ACCEPT 6 -- lo * ::/0 ::/0" and nothing after: the scanner passes it.
        assert!(Shape::of("-i lo -p tcp -j ACCEPT").accepts_loopback_in());
        assert!(!Shape::of("-i lo -p tcp -m tcp -j ACCEPT").accepts_loopback_in());
        assert!(!Shape::of("-i lo -m comment --comment x -j ACCEPT").accepts_loopback_in());
        assert!(!Shape::of("-i lo+ -j ACCEPT").accepts_loopback_in());
        assert!(!Shape::of("! -i lo -j ACCEPT").accepts_loopback_in());
        assert!(!Shape::of("-i lo ! -p tcp -j ACCEPT").accepts_loopback_in());
        assert!(Shape::of("-s ::1/128 -j DROP").drops_loopback_source(v6));
        // The DROP may carry more: the scanner's pattern stops at the addresses.
        assert!(Shape::of("-s ::1/128 -m comment --comment x -j DROP").drops_loopback_source(v6));
        assert!(Shape::of("-s ::1/128 -p udp -j DROP").drops_loopback_source(v6));
        assert!(!Shape::of("-s ::1/128 -i eth0 -j DROP").drops_loopback_source(v6));
        assert!(!Shape::of("! -s ::1/128 -j DROP").drops_loopback_source(v6));
        assert!(!Shape::of("-s ::1/128 -j REJECT").drops_loopback_source(v6));
        assert!(Shape::of("-o lo -p tcp -m tcp --dport 80 -j ACCEPT").accepts_loopback_out());
        assert!(!Shape::of("-o lo -i eth0 -j ACCEPT").accepts_loopback_out());
        assert!(!Shape::of("").accepts_loopback_in());
    }

    #[test]
    fn catch_alls_decide_for_every_packet() {
        for spec in [
            "-j DROP",
            "-j REJECT --reject-with icmp6-port-unreachable",
            "-m comment --comment \"default deny\" -j REJECT",
            "-j ACCEPT",
        ] {
            assert!(Shape::of(spec).catch_all(), "{spec}");
        }
        for spec in [
            "",
            "-j LOG --log-prefix x",
            "-j KUBE-FIREWALL",
            "-p tcp -j DROP",
            "! -i lo -j DROP",
            "-m conntrack --ctstate INVALID -j DROP",
        ] {
            assert!(!Shape::of(spec).catch_all(), "{spec}");
        }
    }
}
