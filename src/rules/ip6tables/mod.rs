//! The iptables family (the seed's ip6tables rules and their IPv4 sibling), pure: `-S` listings
//! parsed with every rule counted (`parse`), evaluated as the CIS scanner reads them (`evaluate`,
//! the one definition of compliant), the smallest plan (`plan`, deletes by specification), what
//! loopguard owns (`ownership`, counts with pending inserts), the legacy kernel table's
//! entries (`blob`) and the `-S` line of the common ones (`decode`). `node::iptables` and `node::legacy` are its effects.

pub mod blob;
pub mod decode;
mod evaluate;
mod ownership;
mod parse;
mod plan;

use super::{Chain, Family, Placement, Rule, RuleKind, distinct};

pub use evaluate::{
    Evaluation, Finding, RuleState, Tables, compliant_pair, evaluate, scanner_counts_as,
};
pub use ownership::{OwnedRule, Ownership};
pub use parse::{ChainListing, LOOK_ALIKE, OPAQUE, Shape, split_args};
pub use plan::{Edit, EditKind, RulePlan, plan_cleanup, plan_enforce};
