//! loopguard: enforce the IPv6 loopback firewall baseline on every node.
