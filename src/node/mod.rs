//! Effects on one node: facts, iptables processes, the state file, netlink drift events.

pub mod converge;
pub mod engine;
pub mod facts;
pub mod families;
pub mod iptables;
pub mod legacy;
pub mod lock;
pub mod lock_events;
pub mod netns;
pub mod nft;
pub mod nft_rules;
pub mod nftables;
pub mod packages;
pub mod state_file;
pub mod ufw;
pub mod watch;

pub use engine::{Engine, EngineConfig, Report};
